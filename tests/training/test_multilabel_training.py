"""Multi-label training (issue 25, part 3): a labels CSV trains with BCE on multi-hot targets, validates by mAP, tunes
per-label thresholds on val into the best checkpoint, and predict applies them."""
import copy
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.cli import main
from finetune.config import parse_recipe
from finetune.training import runner as runner_module
from finetune.training.runner import Runner

from tests.conftest import TINY_RECIPE

DIGITS = 4


def write_mosaics(folder, n=96, seed=0):
    """2x2 mosaics of the digits 0-3 (16 px tiles of scikit-learn's scans): labels = the digits shown (1-4)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_digit = {d: digits.images[digits.target == d] for d in range(DIGITS)}
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shown = rng.choice(DIGITS, size=rng.integers(1, 4), replace=False)
        tiles = [by_digit[int(d)][rng.integers(len(by_digit[int(d)]))] for d in shown]
        tiles += [np.zeros((8, 8))] * (4 - len(tiles))
        order = rng.permutation(4)
        grid = np.block([[tiles[order[0]], tiles[order[1]]], [tiles[order[2]], tiles[order[3]]]])
        image = np.kron(grid / 16 * 255, np.ones((2, 2))).astype(np.uint8)
        Image.fromarray(image).convert("RGB").save(folder / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", ";".join(f"d{d}" for d in sorted(shown))))
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "labels"), *rows])
    return folder / "labels.csv"


def _runner(raw, run_dir):
    runner = Runner(parse_recipe(raw), raw, run_dir=run_dir, resume=False, quiet=True)
    runner.setup()
    return runner


@pytest.fixture
def mosaic_recipe(tmp_path):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(write_mosaics(tmp_path / "mosaics"))
    raw["data"].update(val=0.25, test=0.25)
    raw["stages"] = [{"name": "head", "epochs": 2, "train": "head"}, {"name": "all", "epochs": 2, "train": "all"}]
    raw["training"]["cache_dir"] = str(tmp_path / "cache")
    return raw


@pytest.mark.slow
def test_a_labels_csv_trains_with_bce_on_multi_hot_targets_and_tunes_thresholds_on_val(mosaic_recipe, tmp_path,
                                                                                     monkeypatch, capsys):
    seen = []
    real = runner_module.train_one_epoch

    def spy(module, loader, optimizer, loss_fn, **kwargs):
        seen.append((type(loss_fn).__name__, next(iter(loader))[1]))
        return real(module, loader, optimizer, loss_fn, **kwargs)

    monkeypatch.setattr(runner_module, "train_one_epoch", spy)
    runner = _runner(mosaic_recipe, tmp_path / "run")
    try:
        summary = runner.train()
    finally:
        runner.cleanup()
    assert runner.task == "multilabel" and runner.classes == [f"d{d}" for d in range(DIGITS)]
    names, targets = zip(*seen)
    assert set(names) == {"BinaryCrossEntropy"}
    for batch in targets:  # cached features (head stage) and images (all) alike: multi-hot float rows
        assert batch.ndim == 2 and batch.shape[1] == DIGITS and set(batch.unique().tolist()) <= {0.0, 1.0}
        assert (batch.sum(1) >= 1).all()
    assert summary["best_metric"]["name"] == "map"
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 4

    meta = json.loads((tmp_path / "run" / "checkpoints" / "best" / "checkpoint.json").read_text())
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == DIGITS
    # the thresholds are those that maximise each label's F1 on the val predictions of the best checkpoint
    from finetune.evaluation.multilabel import tune_thresholds
    from finetune.inference.predictor import load

    predictor = load(tmp_path / "run" / "checkpoints" / "best")
    val = runner.manifest.items("val")
    with torch.no_grad():
        from finetune.data import load_image, preprocessing_transform

        cpu = preprocessing_transform(meta["preprocessing"])
        logits = predictor.model(torch.stack([cpu(image=load_image(p))["image"] for p, _ in val])).double()
    probs = torch.sigmoid(logits).numpy()
    expected = tune_thresholds(np.stack([y for _, y in val]).astype(int), probs)["per_class"]
    # calibrated (evaluation.calibrate, the default): the same logit cuts, read on the temperature-scaled sigmoid
    from finetune.inference.temperature import rescale_thresholds

    assert len(meta["temperatures"]) == DIGITS
    np.testing.assert_allclose(meta["thresholds"], rescale_thresholds(expected, meta["temperatures"]), rtol=1e-4, atol=1e-5)

    # predict returns every label at or above its threshold; --threshold overrides them
    paths = [str(p) for p, _ in val[:6]]
    everything = predictor.predict(paths, threshold=0.0)  # every label, with the predictor's own probabilities
    assert all(len(p.labels) == DIGITS for p in everything)
    for prediction, every in zip(predictor.predict(paths), everything):
        prob = dict(zip(every.labels, every.probabilities))
        assert set(prediction.labels) == {f"d{c}" for c in range(DIGITS) if prob[f"d{c}"] >= meta["thresholds"][c]}
        assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tmp_path / "run"), *paths, "--out", str(out), "--threshold", "1.0"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["labels"] for r in rows] == [""] * 6 and set(rows[0]) == {"path", "labels", "probabilities", "error"}

    test = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert test["num_samples"] == summary["test"]["num_samples"] > 0
    assert 0 <= test["map_macro"] <= 1 and [r["threshold"] for r in test["per_class"]] == meta["thresholds"]



def test_multi_label_refuses_the_class_balanced_sampler_in_one_line(mosaic_recipe, tmp_path):
    from finetune.errors import FinetuneError

    sampler = copy.deepcopy(mosaic_recipe)
    sampler["data"]["balance"] = "sampler"
    with pytest.raises(FinetuneError, match="balance: sampler") as raised:
        _runner(sampler, tmp_path / "a")
    assert "\n" not in str(raised.value)


def test_multi_label_mixup_trains_on_mixed_multi_hot_targets(mosaic_recipe, tmp_path, monkeypatch):
    seen = []
    real = runner_module.train_one_epoch

    def spy(module, loader, optimizer, loss_fn, **kwargs):
        inputs, labels = next(iter(loader))[:2]
        seen.append(kwargs["mix"](inputs.clone(), labels)[1])
        return real(module, loader, optimizer, loss_fn, **kwargs)

    monkeypatch.setattr(runner_module, "train_one_epoch", spy)
    mixed = copy.deepcopy(mosaic_recipe)
    mixed["training"]["mixup"] = {"mixup_alpha": 0.4, "cutmix_alpha": 0.0}
    mixed["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    runner = _runner(mixed, tmp_path / "b")
    try:
        runner.train()
    finally:
        runner.cleanup()
    (targets,) = seen
    assert targets.shape[1] == DIGITS and targets.dtype == torch.float32
    assert ((targets > 0) & (targets < 1)).any()  # mixed, not multi-hot
    assert (targets.sum(1) >= 1 - 1e-6).all()  # each row a blend of two label sets of 1-3 labels


def test_single_label_runs_keep_cross_entropy_and_accuracy_selection(tiny_recipe, tmp_path):
    runner = _runner(tiny_recipe, tmp_path / "run")
    try:
        assert runner.task == "single" and runner.select == "accuracy"
        assert type(runner.loss_fn).__name__ == "CrossEntropyLoss"
        assert "task" not in runner._meta()
    finally:
        runner.cleanup()


@pytest.mark.slow
def test_an_interrupted_multilabel_run_resumes_to_the_same_weights_metrics_and_thresholds(mosaic_recipe, tmp_path,
                                                                                           monkeypatch):
    from finetune.models.checkpoint import read_weights
    from finetune.training.runner import run_training

    raw = copy.deepcopy(mosaic_recipe)
    raw["stages"] = [{"name": "head", "epochs": 1, "train": "head"}, {"name": "all", "epochs": 2, "train": "all"}]
    raw["training"].update(mixup={"mixup_alpha": 0.4, "cutmix_alpha": 0.0}, ema=0.9)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_training(parse_recipe(raw), raw, run_dir=full, quiet=True)

    class Interrupted(Exception):
        pass

    save = Runner.save_checkpoint
    calls = []

    def save_then_die(self, optimizer):
        save(self, optimizer)
        calls.append(1)
        if len(calls) == 2:  # after the first epoch of the "all" stage, mixing and EMA under way
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(Runner, "save_checkpoint", save_then_die)
        with pytest.raises(Interrupted):
            run_training(parse_recipe(raw), raw, run_dir=resumed, quiet=True)
    assert main(["train", "--resume", str(resumed), "--quiet"]) == 0

    def rows(run):
        with open(run / "metrics.csv") as f:
            return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in csv.DictReader(f)]

    assert len(rows(full)) == 3 and rows(resumed) == rows(full) and rows(full)[0]["val_map"]
    for which in ("last", "best"):
        a, b = read_weights(full / "checkpoints" / which), read_weights(resumed / "checkpoints" / which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    meta = [json.loads((run / "checkpoints" / "best" / "checkpoint.json").read_text()) for run in (full, resumed)]
    assert meta[0]["thresholds"] == meta[1]["thresholds"] and meta[0]["temperatures"] == meta[1]["temperatures"]


@pytest.mark.parametrize("task, data, message", [
    ("single", "labels", "data.task: single, but"),
    ("multilabel", "folder", "data.task: multilabel, but"),
])
def test_data_task_set_against_the_data_is_one_line(task, data, message, mosaic_recipe, tiny_recipe, tmp_path):
    from finetune.errors import FinetuneError

    raw = copy.deepcopy(mosaic_recipe if data == "labels" else tiny_recipe)
    raw["data"]["task"] = task
    with pytest.raises(FinetuneError, match=message) as raised:
        _runner(raw, tmp_path / "run")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_data_task_set_as_the_data_is_trains(mosaic_recipe, tmp_path):
    raw = copy.deepcopy(mosaic_recipe)
    raw["data"]["task"] = "multilabel"
    runner = _runner(raw, tmp_path / "run")
    try:
        assert runner.task == "multilabel"
    finally:
        runner.cleanup()
