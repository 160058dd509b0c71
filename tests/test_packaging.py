"""A plain (non-editable) install works: every imported distribution is declared, and the dataset cards ship
inside the package."""
import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def declared_requirements() -> set[str]:
    """Distribution names in setup.cfg's install_requires and extras, normalised."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [line for extra in cfg["options.extras_require"].values() for line in extra.splitlines()]
    return {normalise(re.split(r"[<>=!~\[; ]", line.strip())[0]) for line in lines if line.strip()}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the package (at module level or inside functions)."""
    found = set()
    for path in (REPO / "finetune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"finetune"}


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="needs Python 3.10+ to tell the standard library apart")
def test_every_imported_distribution_is_declared():
    owners = packages_distributions()
    imported = imported_modules()
    assert {"cv2", "scipy"} <= imported
    undeclared = {
        module: owners.get(module) for module in imported
        if not {normalise(d) for d in owners.get(module, [])} & declared_requirements()
    }
    assert undeclared == {}


@pytest.mark.slow
def test_non_editable_install_ships_the_dataset_cards(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("finetune", "datasets"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    assert not (target / "finetune" / "cards" / "__init__.py").exists()

    code = ("import finetune; from finetune.data import list_cards, load_card; "
            "print(finetune.__file__); print(list_cards()); print(load_card('caltech101')['split']['train_per_class'])")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()

    assert Path(out[0]).is_relative_to(target)
    assert out[1:] == [str(sorted(p.stem for p in (REPO / "datasets").glob("*.yaml"))), "30"]
