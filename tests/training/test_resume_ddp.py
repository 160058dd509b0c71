"""Exact resume after SIGKILL (the killed run in a real process; the runs to compare with in-process), and DDP
on 2 CPU processes (gloo), through the real command line."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import numpy as np
import yaml

from finetune.models.checkpoint import FROZEN_FILE, read_weights


FINETUNE = [sys.executable, "-m", "finetune"]
VOLATILE = {"seconds", "images_per_s"}


def comparable_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in csv.DictReader(f)]


def weights(run_dir, which="last"):
    return read_weights(run_dir / "checkpoints" / which)


@pytest.fixture
def resume_recipe(tiny_recipe, tmp_path, make_tiny_folder):
    make_tiny_folder(tmp_path / "more", per_class=30, size=48)
    tiny_recipe["data"]["root"] = str(tmp_path / "more")
    tiny_recipe["data"]["input_size"] = 48
    tiny_recipe["data"]["train_transforms"] = [{"name": "RandomResizedCrop", "size": [48, 48], "scale": [0.5, 1.0]},
                                               {"name": "HorizontalFlip"}]
    tiny_recipe["data"]["eval_transforms"] = [{"name": "Resize", "height": 48, "width": 48}]
    tiny_recipe["stages"] = [
        {"name": "head", "epochs": 1, "train": "head"},  # from the feature cache
        {"name": "all", "epochs": 5, "train": "all", "schedule": {"warmup_epochs": 1}},
    ]
    tiny_recipe["training"].update({"batch_size": 4, "ema": 0.9})
    tiny_recipe["output"] = {"evaluate_test": False}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    return path


def test_resume_after_sigkill_ends_with_the_same_weights_and_metrics(resume_recipe, tmp_path, finetune_cli):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert finetune_cli("train", resume_recipe, "--out", full, "--quiet").returncode == 0  # in-process: no imports

    proc = subprocess.Popen([*FINETUNE, "train", str(resume_recipe), "--out", str(killed), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill during the third epoch (stage "all", epoch 2)
        if (killed / "metrics.csv").exists() and len((killed / "metrics.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted_rows = len(comparable_rows(killed))
    assert interrupted_rows < 6, "the run finished before it could be killed"

    assert finetune_cli("train", "--resume", killed, "--quiet").returncode == 0
    assert comparable_rows(killed) == comparable_rows(full)
    for which in ("last", "best"):
        a, b = weights(full, which), weights(killed, which)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (which, k)


def _kill_after_rows(recipe, run, rows, env):
    proc = subprocess.Popen([*FINETUNE, "train", str(recipe), "--out", str(run), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "metrics.csv").exists() and len((run / "metrics.csv").read_text().splitlines()) > rows:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_resume_after_sigkill_in_a_cached_head_stage_with_a_shared_frozen_backbone(resume_recipe, tmp_path,
                                                                                  finetune_cli):
    """Checkpoints of a cached head stage hard-link one frozen.safetensors (the backbone) and write the head:
    a kill among them resumes exactly, and best/last load alone."""
    raw = yaml.safe_load(resume_recipe.read_text())
    raw["stages"] = [{"name": "head", "epochs": 12, "train": "head"}]
    raw["model"]["head"]["width"] = 4  # the backbone is most of the weights
    resume_recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert finetune_cli("train", resume_recipe, "--out", full, "--quiet").returncode == 0  # in-process: no imports
    _kill_after_rows(resume_recipe, killed, 2, env)
    assert len(comparable_rows(killed)) < 12, "the run finished before it could be killed"
    assert (killed / "checkpoints" / "last" / FROZEN_FILE).is_file()
    assert finetune_cli("train", "--resume", killed, "--quiet").returncode == 0
    assert comparable_rows(killed) == comparable_rows(full)
    last = full / "checkpoints" / "last"
    # the backbone file was written with the first epoch's checkpoint and linked since; the head at the last
    assert (last / FROZEN_FILE).stat().st_mtime_ns < (last / "model.safetensors").stat().st_mtime_ns
    for which in ("last", "best"):
        a, b = weights(full, which), weights(killed, which)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (which, k)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_ddp_on_two_cpu_processes_trains_and_reports_metrics_over_the_whole_validation_set(resume_recipe, tmp_path):
    """Documented DDP behaviour: each rank takes batch_size images per step (global batch = batch_size x 2),
    every validation image is counted exactly once, and only rank 0 writes the run folder. So the val
    accuracy logged for the best epoch equals a single-process evaluation of the best checkpoint.

    With data.store: 48 (the decoded pixels of these 48-px PNGs, built by local rank 0 and opened by both) and
    a test split, the run finishes and evaluates the test split: one store per split for both ranks, and every
    rank reaches the store's barrier."""
    raw = yaml.safe_load(resume_recipe.read_text())
    raw["stages"][1]["epochs"] = 2
    raw["training"]["ema"] = None
    raw["data"]["store"] = 48
    raw["output"] = {"evaluate_test": True}
    resume_recipe.write_text(yaml.safe_dump(raw))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "finetune", "train",
                              str(resume_recipe), "--out", str(run), "--quiet", "--set", "training.ddp_timeout=3"],
                             env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("DDP training hung")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = comparable_rows(run)
    assert len(rows) == 3
    summary = yaml.safe_load((run / "summary.json").read_text())
    with open(run / "manifest.csv") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    assert summary["test"]["num_samples"] == splits.count("test") > 0
    assert (run / "eval" / "metrics.json").is_file()
    stores = [f.parent for f in (tmp_path / "cache" / "store").rglob("meta.json")]
    assert sorted(len(np.load(f / "index.npy")) for f in stores) == sorted([splits.count("train"), splits.count("val")])
    assert not list((tmp_path / "cache" / "store").rglob(".*.tmp-*"))  # rank 1 built no store of its own

    from finetune.models.checkpoint import load_checkpoint
    from finetune.data import Manifest, build_transform
    from PIL import Image

    model, meta = load_checkpoint(run / "checkpoints" / "best")
    manifest = Manifest.read_csv(run / "manifest.csv", root=raw["data"]["root"])
    p = meta["preprocessing"]
    transform = build_transform(False, input_size=p["input_size"], mean=p["mean"], std=p["std"],
                                interpolation=p["interpolation"], crop_pct=p["crop_pct"], ops=raw["data"]["eval_transforms"])
    items = manifest.items("val")
    x = torch.stack([transform(image=np.asarray(Image.open(path).convert("RGB")))["image"] for path, _ in items])
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == np.array([label for _, label in items])).mean()
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert acc == pytest.approx(summary["best_val"]["accuracy"], abs=1e-6)

