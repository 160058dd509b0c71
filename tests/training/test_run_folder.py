"""Run folders left by a failed setup or a crash are either resumed or replaced, never silently reused."""
import csv
import shutil

import pytest

import finetune.training.runner as runner_module
from finetune.config import parse_recipe
from finetune.errors import FinetuneError
from finetune.training.runner import Runner, run_training


def train(raw, run_dir, resume=False):
    return run_training(parse_recipe(raw), raw, run_dir=run_dir, resume=resume, quiet=True)


def manifest_splits(run_dir):
    with open(run_dir / "manifest.csv") as f:
        return {row["split"] for row in csv.DictReader(f)}


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in csv.DictReader(f)]


@pytest.fixture
def one_stage(tiny_recipe):
    tiny_recipe["stages"] = [{"name": "all", "epochs": 2, "train": "all"}]
    tiny_recipe["output"] = {"evaluate_test": False}
    return tiny_recipe


def test_a_setup_that_failed_after_writing_the_manifest_is_replaced_with_the_new_split_options(
        one_stage, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = runner_module.create_model

    def fail(*args, **kwargs):
        raise FinetuneError("cannot download the pretrained weights")  # setup fails after the manifest

    monkeypatch.setattr(runner_module, "create_model", fail)
    with pytest.raises(FinetuneError, match="pretrained weights"):
        train(one_stage, run)
    assert manifest_splits(run) == {"train", "val", "test"}

    monkeypatch.setattr(runner_module, "create_model", real)
    one_stage["data"]["test"] = 0  # other split options for the next run into the same folder
    train(one_stage, run)
    assert manifest_splits(run) == {"train", "val"}
    assert len(rows(run)) == 2


def test_a_run_killed_before_its_first_last_checkpoint_is_restarted_not_refused(one_stage, tmp_path):
    run = tmp_path / "run"
    train(one_stage, run)
    reference = rows(run)
    shutil.rmtree(run / "checkpoints" / "last")  # killed after metrics.csv and best, before last
    (run / "summary.json").unlink()
    (run / ".metrics.csv.1a2b3c4d.tmp").write_text("half a file")

    train(one_stage, run)

    assert rows(run) == reference
    assert (run / "checkpoints" / "last" / "training_state.pt").is_file()
    assert not (run / ".metrics.csv.1a2b3c4d.tmp").exists()


def test_a_complete_run_is_still_refused_and_other_files_in_the_folder_are_kept(one_stage, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "manifest.csv").write_text("path,class,split\n")  # a partial setup
    train(one_stage, run)
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(FinetuneError, match="already holds a run"):
        train(one_stage, run)


def test_resume_recovers_a_last_checkpoint_killed_between_the_renames_of_its_swap(one_stage, tmp_path, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(one_stage, full)
    saved = []
    real_save = Runner.save_checkpoint

    def save_and_keep_the_first(self, optimizer):
        real_save(self, optimizer)
        if not saved:
            saved.append(shutil.copytree(self.run_dir / "checkpoints" / "last", tmp_path / "epoch1"))

    monkeypatch.setattr(Runner, "save_checkpoint", save_and_keep_the_first)
    train(one_stage, crashed)
    monkeypatch.undo()
    # the state a kill between "last → last.old" and "tmp → last" leaves while saving epoch 2
    shutil.rmtree(crashed / "checkpoints" / "last")
    shutil.move(saved[0], crashed / "checkpoints" / "last.old")
    (crashed / "checkpoints" / ".last.tmp-0a1b2c3d").mkdir()

    train(one_stage, crashed, resume=True)

    assert rows(crashed) == rows(full)
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["best", "last"]
