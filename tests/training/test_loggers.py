"""Experiment tracking: what TensorBoard's event files and MLflow's file store hold equals the run folder's
own record (metrics.csv, the recipe, the best checkpoint), including across a resume."""
from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from finetune.config import parse_recipe, resolved_dict
from finetune.errors import FinetuneError
from finetune.training.loggers import create_run_logger, flatten
from finetune.training.runner import run_training
from tests.conftest import TINY_RECIPE, write_tiny_folder

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

EPOCH_COLUMNS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "val_balanced_acc")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny run (1 + 2 epochs) logging to csv, TensorBoard and MLflow, then resumed with its last stage
    grown to 3 epochs: 4 epochs in all, the last one logged by the resumed process."""
    tmp = tmp_path_factory.mktemp("loggers")
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(write_tiny_folder(tmp / "tiny"))
    raw["training"].update(cache_dir=str(tmp / "cache"), loggers=["tensorboard", "mlflow"])
    run = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_training(parse_recipe(raw), raw, run_dir=run, quiet=True)
        grown = yaml.safe_load((run / "recipe.yaml").read_text())
        grown["stages"][1]["epochs"] = 3
        (run / "recipe.yaml").write_text(yaml.safe_dump(grown, sort_keys=False))
        run_training(parse_recipe(grown), grown, run_dir=run, resume=True, quiet=True)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    n_train = sum(1 for r in csv.DictReader(open(run / "manifest.csv")) if r["split"] == "train")
    batch = raw["training"]["batch_size"]
    return {"run": run, "rows": rows, "raw": raw, "updates_per_epoch": n_train // batch if n_train > batch else 1}


@pytest.fixture(scope="module")
def tensorboard(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged["run"] / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return events.Reload()


@pytest.fixture(scope="module")
def mlflow_run(logged):
    import json

    from mlflow.tracking import MlflowClient

    record = json.loads((logged["run"] / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    return client, client.get_run(record["run_id"])


def test_tensorboard_holds_metrics_csv_per_epoch_and_every_update(logged, tensorboard):
    rows = logged["rows"]
    assert len(rows) == 4
    for column in EPOCH_COLUMNS:
        assert [e.value for e in tensorboard.Scalars(column)] == pytest.approx([float(r[column]) for r in rows],
                                                                               rel=1e-5), column
    assert [int(e.value) for e in tensorboard.Scalars("epoch")] == [1, 2, 3, 4]
    losses = tensorboard.Scalars("train/loss")
    per_epoch = logged["updates_per_epoch"]
    assert [e.step for e in losses] == list(range(1, 4 * per_epoch + 1))  # one per update, across the resume
    assert [e.step for e in tensorboard.Scalars("val_acc")] == [per_epoch * k for k in (1, 2, 3, 4)]
    # full batches: the mean of an epoch's update losses is its train_loss
    for k, row in enumerate(rows):
        epoch = [e.value for e in losses[k * per_epoch:(k + 1) * per_epoch]]
        assert sum(epoch) / per_epoch == pytest.approx(float(row["train_loss"]), rel=1e-4)
    # the lr each update used: stage 1 (lr 3e-3, cosine) ran its 4 updates, then resumed grown to 6; its 5th
    # update uses the new schedule's lr, not the 0 the old one ended at (which the optimizer state held)
    lrs = [e.value for e in tensorboard.Scalars("train/lr")]
    cosine = [3e-3 * 0.5 * (1 + math.cos(math.pi * k / n)) for n, ks in ((4, range(4)), (6, (4, 5))) for k in ks]
    assert per_epoch == 2 and lrs == pytest.approx([3e-3, 1.5e-3, *cosine])


def test_tensorboard_holds_recall_images_and_the_resolved_recipe(logged, tensorboard):
    from tensorboard.plugins.hparams import plugin_data_pb2

    with open(logged["run"] / "per_class_recall.csv") as f:
        recall = list(csv.DictReader(f))
    for name in ("circle", "square", "stripes"):
        assert [e.value for e in tensorboard.Scalars(f"val_recall/{name}")] == pytest.approx(
            [float(r[name]) for r in recall], rel=1e-5)
    assert {"training_curves", "confusion_matrix", "confusion_matrix_normalized"} <= set(tensorboard.Tags()["images"])
    assert tensorboard.Images("training_curves")[-1].width > 100
    start = tensorboard.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    expected = flatten(resolved_dict(parse_recipe(logged["raw"])))
    assert {k: v.string_value for k, v in hparams.items()} == expected
    assert expected["stages.1.optimizer.lr"] == "0.003" and expected["training.loggers"] == '["csv", "tensorboard", "mlflow"]'
    test = yaml.safe_load((logged["run"] / "summary.json").read_text())["test"]
    assert tensorboard.Scalars("test/accuracy")[-1].value == pytest.approx(test["accuracy"])


def test_mlflow_holds_metrics_csv_the_recipe_images_and_the_best_checkpoint(logged, mlflow_run, tmp_path):
    client, run = mlflow_run
    run_id, rows = run.info.run_id, logged["rows"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    for column in EPOCH_COLUMNS:
        history = sorted(client.get_metric_history(run_id, column), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx([float(r[column]) for r in rows], rel=1e-5), column
    assert len(client.get_metric_history(run_id, "train/loss")) == 4 * logged["updates_per_epoch"]
    assert len(client.get_metric_history(run_id, "val_recall/square")) == 4
    test = json.loads((logged["run"] / "summary.json").read_text())["test"]  # nested dicts flattened
    assert run.data.metrics["test/calibration/ece_after"] == pytest.approx(test["calibration"]["ece_after"])
    # the params are the recipe the run started with (a resume may not change them)
    assert run.data.params == flatten(resolved_dict(parse_recipe(logged["raw"])))
    images = {a.path for a in client.list_artifacts(run_id, "images")}
    assert images == {"images/training_curves.png", "images/confusion_matrix.png",
                      "images/confusion_matrix_normalized.png"}
    best = logged["run"] / "checkpoints" / "best"
    local = Path(client.download_artifacts(run_id, "checkpoints/best", str(tmp_path)))
    for name in ("model.safetensors", "checkpoint.json"):
        assert (local / name).read_bytes() == (best / name).read_bytes()


def test_other_ranks_log_nothing_and_a_failed_run_is_marked_so(tmp_path, monkeypatch):
    import torch
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quiet = create_run_logger(["csv", "tensorboard", "mlflow"], tmp_path / "rank1", enabled=False,
                              experiment="x", classes=["a", "b"])
    quiet.log_params({"a": 1})
    quiet.log_update(torch.tensor(1.0), 0.1)
    quiet.log_epoch({"epoch": 1, "val_acc": 0.5}, {"a": 1.0, "b": 0.0})
    quiet.log_end(tmp_path / "rank1", {"accuracy": 0.5})
    quiet.close()
    assert not (tmp_path / "rank1").exists()

    logger = create_run_logger(["mlflow"], tmp_path / "rank0", enabled=True, experiment="x", classes=["a/b", "a?b"])
    logger.log_epoch({"epoch": 1, "val_acc": 0.5}, {"a/b": 1.0, "a?b": 0.25})
    logger.close()  # never reached log_end: a crash
    client = MlflowClient(tracking_uri=(tmp_path / "rank0" / "mlruns").resolve().as_uri())
    run = client.get_run(logger_run_id(tmp_path / "rank0"))
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"epoch": 1.0, "val_acc": 0.5, "val_recall/a/b": 1.0, "val_recall/a_b": 0.25}


def logger_run_id(run_dir):
    import json

    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_logger_whose_library_is_missing_is_a_one_line_error_naming_the_extra(tiny_recipe, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    tiny_recipe["training"]["loggers"] = ["csv", name]
    with pytest.raises(FinetuneError) as error:
        parse_recipe(tiny_recipe)
    assert str(error.value) == (f'recipe: training.loggers: {name} needs the {name} package: '
                                f'pip install -e ".[{name}]" (got [\'csv\', \'{name}\'])')


def test_loggers_default_to_csv_and_refuse_unknown_names(tiny_recipe):
    assert parse_recipe(tiny_recipe).training.loggers == ["csv"]
    tiny_recipe["training"]["loggers"] = ["wandb"]
    with pytest.raises(FinetuneError, match="training.loggers.0"):
        parse_recipe(tiny_recipe)
