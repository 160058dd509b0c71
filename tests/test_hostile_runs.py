"""Hostile run folders, checkpoints and resumes through the real command line (issue 15).

Each case builds a folder, runs ``finetune ...`` (the console script's ``main``, in this process:
conftest's ``finetune_cli``) and asserts: exit status 2, the error
as the last stderr line (``finetune CMD: error: ...``, the only line when nothing was logged before it),
no traceback, and the folder's contents afterwards. The kill -9 loop test kills ``finetune train`` at
random moments and checks that the folder is always resumable or restartable, and that the command says
which when the other one is tried.
"""
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from finetune.cli import main
from finetune.training import train

FINETUNE = [sys.executable, "-m", "finetune"]


def snapshot(folder):
    """Every file under ``folder`` (hidden ones too) with its bytes; None when it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def recipe(tiny_recipe, tmp_path):
    """A one-stage, one-epoch recipe file on the tiny folder."""
    tiny_recipe["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    tiny_recipe["output"] = {"evaluate_test": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    return path


def finished_run(recipe, tmp_path):
    run = tmp_path / "run"
    train(recipe, out=run)
    return run


# ----------------------------------------------------------------------------------- folder builders

def one_class_data(recipe, tmp_path):
    for name in ("square", "stripes"):
        shutil.rmtree(tmp_path / "tiny" / name)


def folder_with_notes(recipe, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")


def stopped_before_first_checkpoint(recipe, tmp_path):
    run = finished_run(recipe, tmp_path)  # then as if killed after best and metrics.csv, before last
    shutil.rmtree(run / "checkpoints" / "last")
    (run / "summary.json").unlink()


def killed_between_renames_with_temp_folders(recipe, tmp_path):
    checkpoints = finished_run(recipe, tmp_path) / "checkpoints"
    (checkpoints / "last").rename(checkpoints / "last.old")
    for name in (".last.tmp-1a2b3c4d", ".best.tmp-5e6f7a8b"):
        (checkpoints / name).mkdir()
        (checkpoints / name / "model.safetensors").write_bytes(b"half a checkpoint")


def head_changed_in_recipe(recipe, tmp_path):
    run = finished_run(recipe, tmp_path)
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["model"]["head"] = {"name": "linear"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))


def garbage_training_state(recipe, tmp_path):
    run = finished_run(recipe, tmp_path)
    (run / "checkpoints" / "last" / "training_state.pt").write_bytes(b"\x80\x02garbage")


def more_class_names_than_outputs(recipe, tmp_path):
    meta_file = finished_run(recipe, tmp_path) / "checkpoints" / "best" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["classes"] += ["extra1", "extra2"]
    meta_file.write_text(json.dumps(meta))


def nothing(recipe, tmp_path):
    pass


# --------------------------------------------------------------------------------------- the table

# id, folder builder, arguments (after `finetune`), expected in the error, nothing logged before the error,
# what the run folder holds afterwards ("same": as before the command)
CASES = [
    ("one-class-data", one_class_data, ["train", "r.yaml", "--out", "run"],
     "classification needs at least two classes", False, None),
    ("setup-fails-after-manifest-in-a-folder-of-mine", folder_with_notes,
     ["train", "r.yaml", "--out", "run", "--set", "data.val=0", "--set", "data.test=0"],
     "the data needs train and val splits", False, "same"),
    ("out-inside-data-root", nothing, ["train", "r.yaml", "--out", "tiny/runs/x"],
     "--out tiny/runs/x is inside the data root", True, None),
    ("resume-nothing-there", nothing, ["train", "--resume", "run"],
     "nothing to resume in run: no recipe.yaml (not a run folder, or a run killed during its setup); "
     "restartable: finetune train RECIPE --out run", True, None),
    ("resume-stopped-before-first-checkpoint", stopped_before_first_checkpoint, ["train", "--resume", "run"],
     "restartable: finetune train run/recipe.yaml --out run", True, "same"),
    ("fresh-into-a-swap-killed-between-renames", killed_between_renames_with_temp_folders,
     ["train", "r.yaml", "--out", "run"], "run already holds a run; resumable: finetune train --resume run", True,
     "recovered"),
    ("resume-with-another-head", head_changed_in_recipe, ["train", "--resume", "run"],
     "run/recipe.yaml changed since the run started: model.head.name, model.head.width", True, "same"),
    ("resume-tampered-training-state", garbage_training_state, ["train", "--resume", "run"],
     "run/checkpoints/last/training_state.pt is not a training state finetune wrote", True, "same"),
    ("predict-more-class-names-than-outputs", more_class_names_than_outputs, ["predict", "run", "tiny"],
     "lists 5 classes for a model with 3 outputs", True, "same"),
]


@pytest.mark.parametrize("build, args, expected, alone, after", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_hostile_run_folder_is_one_line_exit_2_and_leaves_the_folder_as_stated(
        recipe, tmp_path, build, args, expected, alone, after, finetune_cli):
    build(recipe, tmp_path)
    run = tmp_path / "run"
    before = snapshot(run)

    out = finetune_cli(*args, cwd=tmp_path)

    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert lines and lines[-1].startswith(f"finetune {args[0]}: error: ") and expected in lines[-1], out.stderr
    assert not any("error" in line for line in lines[:-1]), out.stderr
    if alone:
        assert len(lines) == 1, out.stderr
    if after == "same":
        assert snapshot(run) == before
    elif after == "recovered":  # the interrupted swap is undone, the temporary folders are gone
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    else:
        assert not run.exists() and not (tmp_path / "tiny" / "runs").exists()


# ------------------------------------------------------------------------------------ kill -9 loop

def wait_for(condition, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not condition():
        time.sleep(0.01)


def metrics_rows(run):
    path = run / "metrics.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


@pytest.mark.slow
def test_a_run_killed_at_random_moments_is_always_resumable_or_restartable_and_says_which(
        tiny_recipe, tmp_path, capsys):
    tiny_recipe["stages"] = [
        {"name": "head", "epochs": 1, "train": "head", "feature_cache": True},
        {"name": "all", "epochs": 2, "train": "all"},
    ]
    tiny_recipe["output"] = {"evaluate_test": False}
    # a moment to wait for, then a random delay: during setup, the feature cache, checkpoint writes, epochs
    # (a kill before setup leaves no folder: see the resume-nothing-there case)
    moments = {
        "setup": lambda run: run.exists(),
        "cached stage": lambda run: (run / "recipe.yaml").exists(),
        "first checkpoints": lambda run: (run / "checkpoints").exists(),
        "second stage": lambda run: metrics_rows(run) >= 2,
    }
    rng = random.Random(15)
    killed, kinds = 0, set()
    for trial, (moment, reached) in enumerate(moments.items()):
        run = tmp_path / f"run{trial}"
        tiny_recipe["training"]["cache_dir"] = str(tmp_path / f"cache{trial}")  # each trial builds its cache
        recipe = tmp_path / f"r{trial}.yaml"
        recipe.write_text(yaml.safe_dump(tiny_recipe))
        proc = subprocess.Popen([*FINETUNE, "train", str(recipe), "--out", str(run), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: reached(run), proc)
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL

        checkpoints = run / "checkpoints"
        resumable = any((checkpoints / name / "training_state.pt").is_file() for name in ("last", "last.old"))
        kinds.add(resumable)
        fresh, resume = ["train", str(recipe), "--out", str(run), "--quiet"], ["train", "--resume", str(run), "--quiet"]
        wrong, right = (fresh, resume) if resumable else (resume, fresh)
        hint = f"resumable: finetune train --resume {run}" if resumable else "restartable: finetune train "
        capsys.readouterr()
        assert main(wrong) == 2, moment
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("finetune train: error: ") and hint in error, (moment, error)

        assert main(right) == 0, moment
        assert (checkpoints / "best" / "model.safetensors").is_file() and (run / "summary.json").is_file(), moment
        assert metrics_rows(run) == 3, moment
        assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "last"], moment
    assert killed >= 3, "most runs should be killed before they finish"
    assert kinds == {True, False}  # killed in setup: restartable; in the second stage: resumable
