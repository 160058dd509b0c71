"""Shared fixtures: a tiny learnable image folder and a tiny recipe for fast end-to-end runs on CPU."""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n auto` runs one worker per core: one thread each (and in the CLIs they start), not a
    # thread pool per core in every worker. Set before NumPy/torch are imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_CLASSES = ("circle", "square", "stripes")


def write_tiny_folder(root: Path, per_class: int = 12, size: int = 36, seed: int = 0) -> Path:
    """One folder of 3 classes whose images differ by a simple pattern plus noise, so a model can learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = {
        "circle": ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2),
        "square": (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4),
        "stripes": (xx // 4) % 2 == 0,
    }
    for label, mask in patterns.items():
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            img[mask] = rng.integers(180, 255, 3)
            path = root / label / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    return root


@pytest.fixture(autouse=True)
def _private_cache_root(tmp_path_factory, monkeypatch):
    """Caches that default to the cache root (the scan cache, the feature cache) go to one folder of this
    test session, never to the user's ~/.cache/finetune."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))


@dataclass
class CliRun:
    """What one ``finetune`` command did: its exit status and what it printed."""
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def finetune_cli(capfd, monkeypatch):
    """``finetune ARGS`` run in this process: the console script's ``main`` with its own working folder and
    environment, its output captured at the file descriptors, warnings printed as a fresh process would
    print them (not recorded by pytest). A subprocess would re-import torch and timm, ~5 s of CPU per
    command; what only a real process shows (its exit, start-up warnings) is checked by the few tests that
    still start one (test_cli.py, the kill -9 tests, test_hostile_inputs' subprocess case).

        done = finetune_cli("train", "r.yaml", "--out", "run", cwd=tmp_path, env={"FINETUNE_CACHE": ...})
    """
    from finetune.cli import main

    def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliRun:
        with monkeypatch.context() as patch, warnings.catch_warnings():
            if cwd is not None:
                patch.chdir(cwd)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            warnings.simplefilter("default")
            warnings.showwarning = warnings._showwarning_orig  # print to stderr, as `python -m` does
            capfd.readouterr()
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help (0) and usage errors (2)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            out = capfd.readouterr()
        return CliRun(int(code or 0), out.out, out.err)

    return run


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return write_tiny_folder(tmp_path / "tiny")


TINY_RECIPE = {
    "name": "tiny",
    "data": {"val": 0.25, "test": 0.25, "input_size": 32, "num_workers": 0,
             "train_transforms": [{"name": "Resize", "height": 32, "width": 32}, {"name": "HorizontalFlip"}],
             "eval_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
    "model": {"backbone": "test_resnet", "pretrained": False, "head": {"name": "spinal", "width": 16}},
    "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
    "schedule": {"name": "cosine"},
    "stages": [
        {"name": "head", "epochs": 1, "train": "head", "feature_cache": False},
        {"name": "all", "epochs": 2, "train": "all"},
    ],
    "training": {"batch_size": 8, "seed": 0, "device": "cpu"},
}


@pytest.fixture
def tiny_recipe(tiny_folder, tmp_path):
    """A fresh raw recipe dict on ``tiny_folder`` with a private feature-cache folder."""
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(tiny_folder)
    raw["training"]["cache_dir"] = str(tmp_path / "cache")
    return raw


@pytest.fixture
def make_tiny_folder():
    """``write_tiny_folder(root, per_class=12, size=36, seed=0)`` as a fixture."""
    return write_tiny_folder


def pytest_configure(config):
    # `-n auto` hands out tests one at a time (not in blocks of consecutive tests), so the slow tests, sorted
    # first below, spread over the workers instead of queueing on one
    if getattr(config.option, "maxschedchunk", "no xdist") is None:
        config.option.maxschedchunk = 1


# The longest tests, in the order a parallel run should start them: each worker takes two tests at first
# (xdist), so the longest shares its worker with a short one.
LONGEST = ("test_readme_quickstart_commands", "test_readme_data_commands", "test_quickstart_notebook",
           "test_readme_defaults_commands")


def pytest_collection_modifyitems(config, items):
    """The longest tests first, then the other slow ones: a parallel run then ends with many short tests,
    not one long one."""
    def rank(item) -> int:
        longest = [i for i, name in enumerate(LONGEST) if name in item.name]
        return longest[0] if longest else len(LONGEST) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)
