"""Layering: data flows one way. A module imports only from its own layer or lower ones (the private base
modules ``_io``, ``_device``, ``_workers``, ``errors`` < data, models < checkpoint, inference < evaluation <
training < the modules that compose them: audit, export; cli on top), and no module imports, directly or
through others, a module that imports it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
ABOVE = {
    "data": {"models", "training", "evaluation", "inference", "export", "audit", "checkpoint", "cli", "config"},
    "models": {"data", "training", "evaluation", "inference", "export", "audit", "checkpoint", "cli", "config"},
    "evaluation": {"training", "audit", "export", "cli"},
    "training": {"audit", "export", "cli"},
}
BASE = ("_io.py", "_device.py", "_workers.py", "_version.py", "errors.py")


def _imports(path: Path) -> list[str]:
    """The ``finetune...`` modules a file imports (at module level, inside functions and for typing); for
    ``from X import name`` that is ``X.name`` when it is a module, else ``X``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "finetune"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "finetune":
            found += [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                      for a in node.names]
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_from_a_higher_one(layer):
    wrong = {f"{path.relative_to(PACKAGE.parent)} imports {name}"
             for path in sorted((PACKAGE / layer).rglob("*.py")) for name in _imports(path)
             if (name.split(".") + [""])[1] in ABOVE[layer]}
    assert not wrong, sorted(wrong)


def test_the_base_modules_import_only_each_other():
    base = {f"finetune.{name[:-3]}" for name in BASE}
    wrong = {f"{name} imports {m}" for name in BASE for m in _imports(PACKAGE / name) if m not in base}
    assert not wrong, sorted(wrong)
