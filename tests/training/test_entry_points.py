"""Every way to point a run at data (pre-split folder, one folder split by fractions or by a number per class,
a manifest with or without its root, ``finetune train --data`` without a recipe) trains, evaluates the test
split and resumes an interrupted run."""
import copy
import csv
import json
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.config import parse_recipe
from finetune.data import Manifest
from finetune.training.runner import Runner, run_training

# (train, val, test) images per class of the 3-class tiny folders below
FRACTIONS = (6, 3, 3)  # 12 per class, val 0.25, test 0.25
PER_CLASS = (5, 4, 3)  # 12 per class, train_per_class 5, val 0.5 of the 7 left (rounded half up)
PRE_SPLIT = (6, 3, 3)  # the folders' own sizes


class Interrupted(Exception):
    """Stands for a run killed right after its first checkpoint."""


def recipe_for(tiny_recipe, data: dict) -> dict:
    raw = copy.deepcopy(tiny_recipe)
    options = {k: v for k, v in raw["data"].items() if k not in ("root", "val", "test")}
    raw["data"] = {**options, **data}
    raw["stages"] = [{"name": "all", "epochs": 2, "train": "all"}]
    return raw


def split_cli(*argv):
    assert main(["data", "split", *map(str, argv), "--seed", "1"]) == 0


def layouts(tmp_path: Path, make_tiny_folder) -> dict:
    """Layout name -> (data section, dataset root the manifest paths are relative to, images per split)."""
    pre = tmp_path / "pre"
    for split, n, seed in zip(("train", "val", "test"), PRE_SPLIT, (1, 2, 3)):
        make_tiny_folder(pre / split, per_class=n, size=32, seed=seed)
    one = make_tiny_folder(tmp_path / "one", per_class=12, size=32)
    split_cli(one, "--val", "0.25", "--test", "0.25", "--out", one / "split.csv")
    split_cli(one, "--val", "0.25", "--test", "0.25", "--out", tmp_path / "elsewhere" / "split.csv")
    return {
        "pre-split": ({"root": str(pre)}, pre, PRE_SPLIT),
        "fractions": ({"root": str(one), "val": 0.25, "test": 0.25}, one, FRACTIONS),
        "train_per_class": ({"root": str(one), "train_per_class": 5, "val": 0.5}, one, PER_CLASS),
        "manifest with root": ({"root": str(one), "manifest": str(tmp_path / "elsewhere" / "split.csv")}, one, FRACTIONS),
        "manifest without root": ({"manifest": str(one / "split.csv")}, one, FRACTIONS),
        "manifest as root": ({"root": str(one / "split.csv")}, one, FRACTIONS),
    }


def interrupt_after_first_checkpoint(monkeypatch):
    save = Runner.save_checkpoint

    def save_then_die(self, optimizer):
        save(self, optimizer)
        raise Interrupted

    monkeypatch.setattr(Runner, "save_checkpoint", save_then_die)


def check_run(run: Path, root: Path, per_split: tuple[int, int, int]):
    """The run folder's manifest has the expected split sizes and resolves to existing images under ``root``;
    two epochs ran; the test split was evaluated on every test image."""
    manifest = Manifest.read_csv(run / "manifest.csv", root=root)
    assert [sum(c.values()) for c in manifest.counts().values()] == [3 * n for n in per_split]
    assert all(path.is_file() for split in manifest.splits() for path, _ in manifest.items(split))
    with open(run / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    summary = json.loads((run / "summary.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert summary["epochs_run"] == 2
    assert summary["test"]["num_samples"] == metrics["num_samples"] == 3 * per_split[2]
    assert metrics["num_unreadable"] == 0


@pytest.mark.parametrize("layout", ["pre-split", "fractions", "train_per_class", "manifest with root",
                                    "manifest without root", "manifest as root"])
def test_recipe_data_entry_point_trains_evaluates_and_resumes(layout, tiny_recipe, tmp_path, make_tiny_folder,
                                                              monkeypatch):
    data, root, per_split = layouts(tmp_path, make_tiny_folder)[layout]
    raw = recipe_for(tiny_recipe, data)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_after_first_checkpoint(m)
        with pytest.raises(Interrupted):
            run_training(parse_recipe(raw), raw, run_dir=run, quiet=True)
    assert not (run / "summary.json").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    check_run(run, root, per_split)


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_train_data_without_recipe_trains_evaluates_and_resumes(source, tmp_path, make_tiny_folder, monkeypatch):
    one = make_tiny_folder(tmp_path / "one", per_class=12, size=32)
    if source == "manifest":
        split_cli(one, "--val", "0.25", "--test", "0.25", "--out", one / "split.csv")
    data = one / "split.csv" if source == "manifest" else one
    sets = ["data.input_size=32", "data.num_workers=0", "training.batch_size=8", "training.device=cpu",
            f"training.cache_dir={tmp_path / 'cache'}", "stages.0.epochs=1", "stages.1.epochs=1"]
    if source == "folder":
        sets += ["data.val=0.25", "data.test=0.25"]
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--backbone", "test_resnet", "--head", "linear", "--out", str(run), "--quiet"]
    with monkeypatch.context() as m:
        interrupt_after_first_checkpoint(m)
        with pytest.raises(Interrupted):
            main([*argv, *(a for s in sets for a in ("--set", s))])
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    check_run(run, one, FRACTIONS)
