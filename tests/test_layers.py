"""Layering: a module imports only from its own layer or lower ones (data < models < training < evaluation <
the top-level modules that compose them: inference, export, audit, checkpoint; cli on top)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
ABOVE = {
    "data": {"models", "training", "evaluation", "inference", "export", "audit", "checkpoint", "cli", "config"},
    "evaluation": {"audit", "export", "cli"},
}


def _imported(path: Path) -> set[str]:
    """The ``finetune.X`` first-level names a file imports (at module level, inside functions and for typing)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                   else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        names |= {m.split(".")[1] for m in modules if m.startswith("finetune.")}
    return names


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_from_a_higher_one(layer):
    wrong = {f"{path.relative_to(PACKAGE.parent)} imports finetune.{name}"
             for path in sorted((PACKAGE / layer).rglob("*.py")) for name in _imported(path) & ABOVE[layer]}
    assert not wrong, sorted(wrong)
