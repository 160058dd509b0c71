"""Every CLI command that reads a dataset or a checkpoint, as a table, for the hostile-input walks of
tests/test_walk.py (a non-UTF-8 manifest, a tampered checkpoint) and tests/unprivileged_walk.py (a class
folder the process cannot list).

Each command runs in a fresh folder holding ``recipe.yaml`` (conftest's tiny recipe), its images
``tiny/`` (classes circle, square, stripes) and ``ckpt/`` (a random-init test_resnet checkpoint, classes a
and b); ``DATA`` in a command stands for the data under test.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from finetune.errors import MAX_MESSAGE

DATA = "{DATA}"

# (id, argv) of the commands that read a dataset: a folder or a manifest in place of DATA
DATA_COMMANDS = [
    ("train", ("train", "recipe.yaml", "--set", f"data.root={DATA}", "--out", "run")),
    ("train-defaults", ("train", "--data", DATA, "--backbone", "test_resnet", "--pretrained", "none", "--out", "run2")),
    ("lr-find", ("lr-find", "recipe.yaml", "--set", f"data.root={DATA}", "--out", "lr")),
    ("eval", ("eval", "ckpt", "--data", DATA, "--out", "ev", "--device", "cpu")),
    ("calibrate", ("calibrate", "ckpt", "--data", DATA, "--device", "cpu")),
    ("export-int8", ("export", "ckpt", "--format", "onnx", "--quantize", "int8", "--calibration", "4", "--data", DATA,
                     "--out", "m.int8.onnx")),
    ("data-inspect", ("data", "inspect", DATA)),
    ("data-split", ("data", "split", DATA, "--out", "split.csv")),
    ("data-audit", ("data", "audit", DATA, "--out", "audit", "--backbone", "test_resnet", "--pretrained", "none",
                    "--device", "cpu")),
]
FOLDER_ONLY = [("predict", ("predict", "ckpt", DATA, "--out", "p.csv", "--device", "cpu"))]
"""Commands that take a folder of images but not a manifest."""

# (id, argv) of the commands that load a checkpoint (``ckpt``)
CHECKPOINT_COMMANDS = [
    ("eval", ("eval", "ckpt", "--data", "tiny", "--out", "ev", "--device", "cpu")),
    ("calibrate", ("calibrate", "ckpt", "--data", "tiny", "--device", "cpu")),
    ("predict", ("predict", "ckpt", "tiny/circle/000.png", "--out", "p.csv", "--device", "cpu")),
    ("explain", ("explain", "ckpt", "tiny/circle/000.png", "--out", "heat", "--device", "cpu")),
    ("export", ("export", "ckpt", "--format", "safetensors", "--out", "m.safetensors")),
    ("benchmark", ("benchmark", "ckpt", "--batch", "1", "--iterations", "1", "--json", "bench.json")),
]

# (id, what is changed in checkpoint.json, the text the error line must hold)
TAMPERS = [
    ("drop-rate-text", {"backbone_kwargs": {"drop_rate": "x"}}, "backbone_kwargs: drop_rate must be a number from 0 to 1"),
    ("kwargs-not-a-mapping", {"backbone_kwargs": ["drop_rate"]}, "backbone_kwargs: must be a mapping"),
    ("duplicate-classes", {"classes": ["a", "a"]}, "classes names 'a' more than once"),
    ("num-classes-text", {"num_classes": "three"}, "num_classes must be a whole number of outputs, got 'three'"),
]


def argv_with(argv: tuple[str, ...], data: str) -> tuple[str, ...]:
    return tuple(a.replace(DATA, data) for a in argv)


def tiny_checkpoint(folder: Path, changes: dict | None = None) -> None:
    """A random-init test_resnet checkpoint at ``folder/ckpt`` (classes a, b; 32 px), its checkpoint.json
    then updated with ``changes``."""
    from finetune.models.checkpoint import META_FILE, save_checkpoint
    from finetune.models import create_model

    preprocessing = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                     "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    model = create_model("test_resnet", 2, head="linear").eval()
    save_checkpoint(folder / "ckpt", model, {"classes": ["a", "b"], "preprocessing": preprocessing, "metrics": {},
                                             "recipe": {"data": {"seed": 0}}})
    if changes:
        meta = json.loads((folder / "ckpt" / META_FILE).read_text())
        meta.update(changes)
        (folder / "ckpt" / META_FILE).write_text(json.dumps(meta))


def workspace(folder: Path, tiny_recipe: dict, checkpoint_changes: dict | None = None) -> None:
    """The folder every walked command runs in (module docstring)."""
    tiny_recipe["output"] = {"dir": "runs/{name}"}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe))
    tiny_checkpoint(folder, checkpoint_changes)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` that can be listed → its bytes (None for a folder)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # an unlistable folder is passed over, as it is unchanged
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(path, root)] = Path(path).read_bytes()
            except OSError:
                out[os.path.relpath(path, root)] = b"(unreadable)"
    return out


def check_one_line(done, expect: str) -> None:
    """Exit status 2, no traceback, stderr one line of at most MAX_MESSAGE characters holding ``expect``."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert lines and expect in lines[-1], done.stderr[-3000:]
    assert lines[-1].startswith("finetune ") and ": error: " in lines[-1], lines[-1]
    assert len(lines[-1]) <= MAX_MESSAGE
