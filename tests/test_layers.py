"""The house by verb (docs/ARCHITECTURE.md): one package per thing a user does, data flowing one way.

A module imports only from its own package and the floors below it (`ALLOWED`), directly, inside
functions or for typing; no module imports, directly or through others, a module that imports it; the top
level holds only packages and the private helpers; no module is over `MAX_LINES` lines; the names that moved
still import from their old place, with a DeprecationWarning.
"""
from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
PRIVATE = {"errors", "_version", "_io", "_device", "_workers", "_distributed", "_moved"}
"""The private helpers at the bottom (and ``errors``, the one exception type)."""
BELOW_PRIVATE = {"errors": set(), "_version": set(), "_moved": set(), "_workers": set(), "_io": {"errors"},
                 "_device": {"errors"}, "_distributed": {"_device", "errors"}}
FLOORS = ["data", "models", "config", "features", "inference", "evaluation", "training", "audit", "deploy", "cli"]
ALLOWED = {
    "data": set(),
    "models": set(),
    "config": {"models"},
    "features": {"data", "models"},
    "inference": {"data", "models"},
    "evaluation": {"data", "models", "inference"},
    "training": {"data", "models", "config", "features", "inference", "evaluation"},
    "audit": {"data", "models", "features", "inference", "evaluation"},
    "deploy": {"data", "models", "inference"},
    "cli": set(FLOORS),
}
"""Package → the packages below it that it may import (besides itself and the private helpers)."""
MAX_LINES = 450
TOP_LEVEL = {"__init__.py", "__main__.py", *(f"{name}.py" for name in PRIVATE), *FLOORS}


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


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("package", FLOORS)
def test_a_package_imports_only_from_the_floors_below_it(package):
    allowed = {package, *ALLOWED[package], *PRIVATE}
    wrong = {f"{path.relative_to(PACKAGE.parent)} imports {name}"
             for path in sorted((PACKAGE / package).rglob("*.py")) for name in _imports(path)
             if _package(name) not in allowed}
    assert not wrong, sorted(wrong)


def test_the_floor_check_sees_an_import_from_above(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from finetune.training.runner import Runner\n")
    assert _package(_imports(module)[0]) == "training" and "training" not in ALLOWED["models"]


def test_the_private_helpers_import_nothing_above_them():
    wrong = {f"{name} imports {m}" for name, below in BELOW_PRIVATE.items()
             for m in _imports(PACKAGE / f"{name}.py") if _package(m) not in below}
    assert not wrong, sorted(wrong)


def test_the_top_level_holds_only_packages_and_the_private_helpers():
    found = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())}
    assert found - {"cards"} == TOP_LEVEL - {"cards"}


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


MOVED_NAMES = [
    ("finetune.checkpoint", "load_checkpoint", "finetune.models.checkpoint"),
    ("finetune.calibration", "fit_temperature", "finetune.inference.temperature"),
    ("finetune.tta", "TtaModel", "finetune.inference.tta"),
    ("finetune.export", "export_model", "finetune.deploy.export"),
    ("finetune.export", "read_onnx_info", "finetune.deploy.onnx"),
    ("finetune.benchmark", "benchmark", "finetune.deploy.benchmark"),
    ("finetune.training.feature_cache", "stage_features", "finetune.features.cache"),
    ("finetune.training.feature_cache", "extract_features", "finetune.features.extract"),
    ("finetune.training.feature_cache", "is_head_only", "finetune.models.params"),
    ("finetune.training.freeze", "select_trainable", "finetune.models.params"),
    ("finetune.training.selection", "record", "finetune.training.best_epoch"),
    ("finetune.training.distributed", "DistInfo", "finetune._distributed"),
    ("finetune.training.cuda", "configure_cuda", "finetune._device"),
    ("finetune.evaluation.audit_report", "render_audit", "finetune.audit.report"),
    ("finetune.data.images", "load_image", "finetune.data.decode"),
    ("finetune.data.images", "hash_leaks", "finetune.data.similarity"),
    ("finetune.data.images", "scan_images", "finetune.data.scan"),
    ("finetune.data.manifest", "prepare_manifest", "finetune.data.prepare"),
    ("finetune.data.layout", "split_classes", "finetune.data.split"),
    ("finetune.data.transforms", "resolve_preprocessing", "finetune.models.factory"),
]


@pytest.mark.parametrize("old, name, new", MOVED_NAMES, ids=[f"{o}.{n}" for o, n, _ in MOVED_NAMES])
def test_a_moved_name_still_imports_from_its_old_place_with_a_deprecation_warning(old, name, new):
    from finetune import _moved

    if old in _moved.MOVED:
        sys.modules.pop(old, None)  # an alias module holds nothing: import it afresh so it warns again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(old in m and new.rsplit(".", 1)[0] in m for m in messages), messages
