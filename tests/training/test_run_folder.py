"""Run folders left by a failed setup or a crash are either resumed or replaced, never silently reused."""
import csv
import shutil
from pathlib import Path

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


def fail_after_the_manifest(monkeypatch):
    def fail(*args, **kwargs):
        raise FinetuneError("cannot download the pretrained weights")

    monkeypatch.setattr(runner_module, "create_model", fail)


def snapshot(folder):
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_setup_that_fails_after_the_manifest_leaves_no_run_folder_and_the_next_run_makes_its_own_split(
        one_stage, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "run"
    fail_after_the_manifest(monkeypatch)
    with pytest.raises(FinetuneError, match="pretrained weights"):
        train(one_stage, run)
    assert not (tmp_path / "runs").exists()  # nor the parent it created

    monkeypatch.undo()
    one_stage["data"]["test"] = 0  # other split options for the next run into the same folder
    train(one_stage, run)
    assert manifest_splits(run) == {"train", "val"}
    assert len(rows(run)) == 2
    assert not (run / ".setup.tmp").exists()


def test_a_setup_that_fails_leaves_a_folder_that_existed_as_it_was(one_stage, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "manifest.csv").write_text("path,class,split\n")  # what an older failed setup left
    (run / ".setup.tmp").mkdir()  # and a setup killed while staging its files
    before = snapshot(run)
    fail_after_the_manifest(monkeypatch)
    with pytest.raises(FinetuneError, match="pretrained weights"):
        train(one_stage, run)
    assert snapshot(run) == before and not (run / ".setup.tmp").exists()


def test_a_one_class_dataset_is_refused_and_leaves_nothing(one_stage, tmp_path, make_tiny_folder):
    root = make_tiny_folder(tmp_path / "one")
    for name in ("square", "stripes"):
        shutil.rmtree(root / name)
    one_stage["data"]["root"] = str(root)
    with pytest.raises(FinetuneError, match="needs at least two classes; .* has 1: circle"):
        train(one_stage, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_output_folder_inside_the_data_root_is_refused_before_anything_is_written(one_stage, tmp_path):
    root = tmp_path / "tiny"
    before = snapshot(root)
    for out in (root, root / "runs" / "x"):
        with pytest.raises(FinetuneError, match="is inside the data root"):
            train(one_stage, out)
    assert snapshot(root) == before and not (root / "runs").exists()


def test_a_recipe_whose_stages_all_have_0_epochs_is_refused(one_stage):
    one_stage["stages"] = [{"name": "a", "epochs": 0}, {"name": "b", "epochs": 0, "train": "head"}]
    with pytest.raises(FinetuneError, match="stages: at least one stage needs epochs > 0"):
        parse_recipe(one_stage)


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


def test_resume_of_a_run_stopped_before_its_first_checkpoint_says_it_is_restartable(one_stage, tmp_path):
    run = tmp_path / "run"
    train(one_stage, run)
    shutil.rmtree(run / "checkpoints" / "last")
    with pytest.raises(FinetuneError) as e:
        train(one_stage, run, resume=True)
    assert str(e.value) == (
        f"nothing to resume in {run}: no checkpoints/last/training_state.pt (the run stopped before its first "
        f"checkpoint); restartable: finetune train {run / 'recipe.yaml'} --out {run}"
    )


def test_a_full_disk_while_writing_last_is_one_line_and_the_previous_checkpoint_stays(
        one_stage, tmp_path, monkeypatch):
    import errno

    run = tmp_path / "run"
    real = Path.write_bytes
    writes = []

    def full_disk_at_the_second_last(self, data):  # weights and training state are written by Python
        if ".last.tmp-" in str(self) and self.name == "training_state.pt":
            writes.append(self)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_at_the_second_last)
    with pytest.raises(FinetuneError) as e:
        train(one_stage, run)
    message = str(e.value)
    assert message == f"cannot write {run / 'checkpoints' / 'last'}: No space left on device"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]  # no temporary folder left

    monkeypatch.undo()
    train(one_stage, run, resume=True)  # the epoch-1 checkpoint is intact
    assert len(rows(run)) == 2


def resumable_run(one_stage, tmp_path):
    run = tmp_path / "run"
    one_stage["stages"][0]["epochs"] = 1
    train(one_stage, run)
    return run


def edit_recipe(run, change):
    import yaml

    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    change(raw)
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))


def resume(run):
    from finetune.training import train as train_entry

    return train_entry(None, resume=run)


@pytest.mark.parametrize("change, keys", [
    (lambda r: r["model"].update(head={"name": "linear"}), "model.head.name, model.head.width"),
    (lambda r: r["model"].update(backbone="test_efficientnet"), "model.backbone"),
    (lambda r: r["training"].update(batch_size=4), "training.batch_size"),
    (lambda r: r["stages"][0].update(train="last:1"), "stages.0.train"),
    (lambda r: r["data"].update(val=0.5), "data.val"),
])
def test_resume_refuses_a_recipe_changed_in_what_it_trains_naming_the_keys(one_stage, tmp_path, change, keys):
    run = resumable_run(one_stage, tmp_path)
    edit_recipe(run, change)
    before = snapshot(run)
    with pytest.raises(FinetuneError) as e:
        resume(run)
    assert str(e.value).startswith(f"{run / 'recipe.yaml'} changed since the run started: {keys} (")
    assert "\n" not in str(e.value)
    assert snapshot(run) == before


def test_resume_accepts_more_epochs_and_other_workers_and_trains_the_added_epochs(one_stage, tmp_path, caplog):
    run = resumable_run(one_stage, tmp_path)
    edit_recipe(run, lambda r: (r["stages"][0].update(epochs=3), r["data"].update(num_workers=1),
                                r["output"].update(evaluate_test=False)))
    summary = resume(run)
    assert summary["epochs_run"] == 3 and len(rows(run)) == 3
    assert "stages.0.epochs 1 -> 3" in caplog.text


def test_resume_refuses_fewer_epochs_than_the_run_started_with(one_stage, tmp_path):
    run = resumable_run(one_stage, tmp_path)
    one_stage["stages"][0]["epochs"] = 3
    edit_recipe(run, lambda r: r["stages"][0].update(epochs=3))
    resume(run)
    edit_recipe(run, lambda r: r["stages"][0].update(epochs=2))
    with pytest.raises(FinetuneError, match=r"changed since the run started: stages\.0\.epochs \(3 -> 2"):
        resume(run)


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("content", [b"\x00garbage bytes", "pickle"])
def test_resume_refuses_a_tampered_training_state_in_one_line(one_stage, tmp_path, content):
    import pickle

    run = resumable_run(one_stage, tmp_path)
    state = run / "checkpoints" / "last" / "training_state.pt"
    state.write_bytes(pickle.dumps({"stage_index": _Exploit()}) if content == "pickle" else content)
    with pytest.raises(FinetuneError) as e:
        resume(run)
    assert str(e.value).startswith(f"{state} is not a training state finetune wrote (")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["model.safetensors", "frozen.safetensors"])
def test_resume_refuses_truncated_weights_in_the_last_checkpoint(one_stage, tmp_path, name):
    run = resumable_run(one_stage, tmp_path)
    weights = run / "checkpoints" / "last" / name  # a head stage: the frozen backbone has its own file
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(FinetuneError, match=f"{weights} is not a readable safetensors file"):
        resume(run)
