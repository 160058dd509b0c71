"""Hostile data and outputs through the real CLI (issue 15): special files in a dataset, outputs that
cannot be written. Each bad output is one line on stderr, exit status 2, no traceback, and the folder
looks afterwards as it did before. Data that disappears during training is tested in-process below."""
from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.models.checkpoint import load_checkpoint, save_checkpoint
from finetune.config import parse_recipe
from finetune.errors import FinetuneError
from finetune.models import create_model
from finetune.training import runner as runner_module
from finetune.training.runner import run_training

CLASSES = ["circle", "square", "stripes"]
PREPROCESSING = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                 "crop_pct": 1.0, "crop_mode": "center"}


def finetune_cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; a hang (a FIFO opened for reading) fails the test after ``timeout``."""
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` → its bytes (None for a folder): what "nothing was written" compares."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.is_fifo()}


def write_pngs(root: Path, per_class: int) -> Path:
    """``per_class`` small noise PNGs in a folder per class."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny dataset, a random-init checkpoint and ``blocker``, a regular file outputs cannot go under."""
    root = tmp_path_factory.mktemp("hostile")
    write_pngs(root / "data", per_class=4)
    torch.manual_seed(0)
    model = create_model("test_resnet", len(CLASSES), head={"name": "spinal", "width": 16}).eval()
    save_checkpoint(root / "ckpt", model, {"classes": CLASSES, "preprocessing": PREPROCESSING, "metrics": {},
                                            "recipe": {"data": {"seed": 0, "val": 0.25, "test": 0.25}}})
    (root / "blocker").write_text("a regular file\n")
    return root


# One row per command whose output cannot be written: (id, arguments, words the error line must hold).
BAD_OUTPUTS = [
    ("train-out-under-a-file", ["train", "--data", "data", "--backbone", "test_resnet", "--out", "blocker/run"],
     ["blocker/run", "blocker is a file, not a folder"]),
    ("eval-out-under-a-file", ["eval", "ckpt", "--data", "data", "--split", "all", "--num-workers", "0",
                               "--out", "blocker/eval"], ["blocker/eval", "blocker is a file, not a folder"]),
    ("predict-out-under-a-file", ["predict", "ckpt", "data/circle", "--num-workers", "0", "--out", "blocker/p.csv"],
     ["blocker/p.csv", "blocker is a file, not a folder"]),
    ("predict-out-in-proc", ["predict", "ckpt", "data/circle", "--num-workers", "0",
                             "--out", "/proc/finetune-test/p.csv"], ["/proc/finetune-test"]),
    ("export-out-under-a-file", ["export", "ckpt", "--format", "safetensors", "--out", "blocker/m.safetensors"],
     ["blocker/m.safetensors", "blocker is a file, not a folder"]),
    ("split-out-under-a-file", ["data", "split", "data", "--out", "blocker/m.csv"], ["blocker/m.csv", "blocker is a file, not a folder"]),
    ("split-report-under-a-file", ["data", "split", "data", "--out", "m.csv", "--report", "blocker/bad.csv"],
     ["blocker/bad.csv", "blocker is a file, not a folder"]),
]


@pytest.mark.parametrize("args, words", [row[1:] for row in BAD_OUTPUTS], ids=[row[0] for row in BAD_OUTPUTS])
def test_an_output_that_cannot_be_written_is_one_line_and_writes_nothing(workspace, args, words):
    before = snapshot(workspace)
    result = finetune_cli(workspace, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) >= 1 and lines[-1].startswith(f"finetune {args[0]}: error: "), result.stderr
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    assert snapshot(workspace) == before


def test_a_fifo_and_a_dangling_link_are_bad_files_not_a_hang(tmp_path):
    """A FIFO named like an image blocks whoever opens it for reading; a dangling link has no content."""
    data = write_pngs(tmp_path / "data", per_class=4)
    os.mkfifo(data / "circle" / "pipe.png")
    os.symlink(tmp_path / "nowhere.png", data / "square" / "dangling.png")
    result = finetune_cli(tmp_path, "data", "split", "data", "--out", "data/manifest.csv", timeout=30)
    assert result.returncode == 0, result.stderr
    report = (data / "manifest.bad.csv").read_text().splitlines()
    assert report[0] == "path,reason"
    assert sorted(report[1:]) == ["circle/pipe.png,not a regular file (a FIFO)",
                                  "square/dangling.png,cannot read file: broken symbolic link (its target does not exist)"]
    manifest = (data / "manifest.csv").read_text()
    assert "pipe.png" not in manifest and "dangling.png" not in manifest and manifest.count("\n") == 13


# ------------------------------------------------------------------ data that disappears during training

def vanishing_recipe(tiny_recipe: dict, folder: Path) -> dict:
    raw = copy.deepcopy(tiny_recipe)
    # the files are read every epoch (with the pixel store, images deleted after it was built still train)
    raw["data"].update(root=str(folder), test=0.0, val=0.25, store="off")
    raw["stages"] = [{"name": "all", "epochs": 3, "train": "all"}]
    raw["training"]["batch_size"] = 2
    raw["output"] = {"evaluate_test": False}
    return raw


def remove_after_first_epoch(monkeypatch, run_dir: Path, split: str, which=lambda paths: paths):
    """Delete ``which`` of the split's images (read from the run's manifest) after training's first epoch."""
    real = runner_module.train_one_epoch
    calls = []

    def train_one_epoch(*args, **kwargs):
        if len(calls) == 1:
            rows = [line.split(",") for line in (run_dir / "manifest.csv").read_text().splitlines()[1:]]
            paths = sorted(Path(run_dir.parent / "data" / r[0]) for r in rows if r[2] == split)
            for path in which(paths):
                path.unlink()
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_one_epoch", train_one_epoch)


def train(raw, run_dir):
    return run_training(parse_recipe(raw), raw, run_dir=run_dir, quiet=True)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_whose_images_all_vanish_is_one_error_naming_it_and_last_stays_valid(
        tiny_recipe, make_tiny_folder, tmp_path, monkeypatch, split):
    make_tiny_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    remove_after_first_epoch(monkeypatch, run, split)
    with pytest.raises(FinetuneError) as raised:
        train(vanishing_recipe(tiny_recipe, tmp_path / "data"), run)
    message = str(raised.value)
    assert "\n" not in message
    assert f"no readable image left in the {split} split" in message and "epoch 2" in message
    model, _ = load_checkpoint(run / "checkpoints" / "last")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    state = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert state["epoch_in_stage"] == 1
    assert (run / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1


def test_vanished_training_images_are_skipped_and_counted_and_a_batch_of_one_is_dropped(
        tiny_recipe, make_tiny_folder, tmp_path, monkeypatch, caplog):
    """A third of the training images vanish: some batches of 2 shrink to one sample, which BatchNorm
    cannot train on (test_resnet's last stage is 1×1 at 32 px)."""
    make_tiny_folder(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    remove_after_first_epoch(monkeypatch, run, "train", which=lambda paths: paths[::3])
    seen = []
    real = runner_module.train_one_epoch

    def record(*args, **kwargs):
        stats = real(*args, **kwargs)
        seen.append((stats.samples, stats.skipped))
        return stats

    monkeypatch.setattr(runner_module, "train_one_epoch", record)
    with caplog.at_level("WARNING", logger="finetune"):
        train(vanishing_recipe(tiny_recipe, tmp_path / "data"), run)
    assert seen[0] == (18, 0)
    for samples, skipped in seen[1:]:
        # the 6 vanished images are skipped, and so is each survivor of a batch they shrank to one
        assert samples + skipped == 18 and skipped > 6 and samples % 2 == 0
    assert "epoch 2: skipped" in caplog.text
    assert (run / "metrics.csv").read_text().count("\n") == 4


# ------------------------------------------------------------------------ full disks and read-only outputs

def failing(monkeypatch, module, name: str, code: int):
    """Make ``module.name`` raise OSError(code), as a full disk or a read-only filesystem does."""
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_a_full_disk_during_export_is_one_line_and_leaves_the_previous_export(workspace, tmp_path, monkeypatch, fmt):
    from finetune.deploy.export import export_model

    out = tmp_path / f"model.{fmt}"
    export_model(workspace / "ckpt", format=fmt, out=out)
    before = snapshot(tmp_path)
    failing(monkeypatch, os, "fsync", errno.ENOSPC)
    with pytest.raises(FinetuneError) as raised:
        export_model(workspace / "ckpt", format=fmt, out=out)
    assert str(raised.value) == f"cannot write {out}: No space left on device"
    assert snapshot(tmp_path) == before  # the old model and labels, and no temporary file


def test_a_full_disk_during_eval_is_one_line_and_leaves_the_previous_results(workspace, tmp_path, monkeypatch):
    from finetune.evaluation import evaluate

    model, meta = load_checkpoint(workspace / "ckpt")
    items = [(workspace / "data" / name / "0.png", i) for i, name in enumerate(CLASSES)]
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("the previous evaluation\n")
    failing(monkeypatch, os, "fsync", errno.ENOSPC)
    with pytest.raises(FinetuneError) as raised:
        evaluate(model, items, class_names=CLASSES, preprocessing=meta["preprocessing"], out_dir=out)
    assert raised.value.args[0].startswith(f"cannot write {out}/") and raised.value.args[0].endswith(
        ": No space left on device")
    assert snapshot(tmp_path) == {"eval": None, "eval/metrics.json": b"the previous evaluation\n"}


@pytest.mark.parametrize("name, code, reason", [("mkdir", errno.EROFS, "Read-only file system"),
                                                ("fsync", errno.ENOSPC, "No space left on device")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_the_previous_one(
        workspace, tmp_path, monkeypatch, name, code, reason):
    model, meta = load_checkpoint(workspace / "ckpt")
    path = save_checkpoint(tmp_path / "checkpoints" / "last", model, meta)
    before = snapshot(tmp_path)
    failing(monkeypatch, os, name, code)
    with pytest.raises(FinetuneError) as raised:
        save_checkpoint(path, model, meta)
    assert str(raised.value) == f"cannot write {path}: {reason}"
    assert snapshot(tmp_path) == before  # no temporary folder left either
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["classes"] == CLASSES


def test_predict_onto_a_read_only_filesystem_is_one_line(workspace, tmp_path, monkeypatch, capsys):
    from finetune.cli import main

    failing(monkeypatch, os, "mkdir", errno.EROFS)
    out = tmp_path / "new" / "p.csv"
    assert main(["predict", str(workspace / "ckpt"), str(workspace / "data" / "circle" / "0.png"),
                 "--num-workers", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"finetune predict: error: cannot write {out}: Read-only file system\n"
    assert list(tmp_path.iterdir()) == []
