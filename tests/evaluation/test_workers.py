"""`finetune eval`, `finetune predict` and the test evaluation after training decode with the training's
worker policy (``auto``: the CPU cores, at most 8), not on one process, each worker collating into the
shared-memory buffers of a `BatchPool`."""
import os

import pytest

import finetune.data.batch_pool as batch_pool
from finetune._workers import worker_init
from finetune.cli import main
from finetune.config import parse_recipe
from finetune.data import BatchPool
from finetune.inference import load
from finetune.training.runner import run_training


@pytest.fixture
def loader_workers(monkeypatch):
    """The num_workers of every loader eval and predict build (run with 0 workers to stay fast), on a
    machine with 3 cores."""
    seen = []
    real = batch_pool.DataLoader

    def spy(*args, num_workers, **kwargs):
        seen.append(num_workers)
        assert kwargs.get("worker_init_fn") is worker_init  # each worker keeps the memory it frees
        # workers write their uint8 batches into buffers they reuse, handed back once normalised
        assert isinstance(kwargs["collate_fn"], BatchPool) == (num_workers > 0)
        kept = {k: v for k, v in kwargs.items() if k not in ("persistent_workers", "prefetch_factor")}
        return real(*args, num_workers=0, **kept)

    monkeypatch.setattr(batch_pool, "DataLoader", spy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    return seen


def test_eval_and_predict_commands_use_auto_workers_by_default(checkpoint, image_folder, tmp_path, loader_workers):
    assert main(["eval", str(checkpoint), "--data", str(image_folder), "--split", "all", "--batch-size", "2",
                 "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert main(["predict", str(checkpoint), str(image_folder), "--batch-size", "2", "--device", "cpu",
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert loader_workers == [3, 3]


def test_eval_and_predict_commands_honour_num_workers(checkpoint, image_folder, tmp_path, loader_workers):
    assert main(["eval", str(checkpoint), "--data", str(image_folder), "--split", "all", "--batch-size", "2",
                 "--num-workers", "1", "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert main(["predict", str(checkpoint), str(image_folder), "--batch-size", "2", "--num-workers", "0",
                 "--device", "cpu", "--out", str(tmp_path / "p.csv")]) == 0
    assert loader_workers == [1, 0]


def test_a_single_batch_is_decoded_in_process(checkpoint, image_folder, loader_workers):
    load(checkpoint).predict(sorted(image_folder.rglob("*.png")), batch_size=64, num_workers="auto")
    assert loader_workers == [0]  # no batch to overlap with: starting workers would only cost time


def test_num_workers_must_be_a_count_or_auto(checkpoint, image_folder, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(checkpoint), str(image_folder), "--num-workers", "many"])
    assert "--num-workers" in capsys.readouterr().err


@pytest.mark.parametrize("num_workers, expected", [("auto", 3), (1, 1)])
def test_test_evaluation_after_training_uses_the_recipes_num_workers(tiny_recipe, tmp_path, loader_workers,
                                                                     monkeypatch, num_workers, expected):
    import finetune.training.loaders as loaders

    monkeypatch.setattr(loaders, "make_loader", _in_process(loaders.make_loader))  # training stays at 0 workers
    tiny_recipe["data"]["num_workers"] = num_workers
    tiny_recipe["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    tiny_recipe["training"]["eval_batch_size"] = 4  # the 9 val and the 9 test images in 3 batches each
    summary = run_training(parse_recipe(tiny_recipe), tiny_recipe, run_dir=tmp_path / "run", quiet=True)
    assert summary["test"]["num_samples"] == 9 and summary["calibration"]["num_samples"] == 9
    assert loader_workers == [expected, expected]  # the calibration on val, then the test evaluation


def _in_process(make_loader):
    def make(*args, **kwargs):
        return make_loader(*args, **{**kwargs, "num_workers": 0})
    return make
