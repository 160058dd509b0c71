import csv
import json

import pytest
import torch

from finetune.models.checkpoint import load_checkpoint, read_weights
from finetune.config import parse_recipe
from finetune.errors import FinetuneError
from finetune.training.runner import run_training


def train(raw, run_dir):
    return run_training(parse_recipe(raw), raw, run_dir=run_dir, quiet=True)


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_the_whole_run_folder(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_recipe, run)
    for name in ("recipe.yaml", "manifest.csv", "metrics.csv", "per_class_recall.csv", "training_curves.png",
                 "summary.json", "checkpoints/last/model.safetensors", "checkpoints/best/checkpoint.json",
                 "eval/metrics.json"):
        assert (run / name).exists(), name
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["stage"]) for r in rows] == [0, 1, 1]
    assert set(rows[0]) >= {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "images_per_s", "seconds"}
    saved = json.loads((run / "summary.json").read_text())
    assert saved["best_metric"]["name"] == "accuracy"
    assert 1 <= saved["best_epoch"] <= 3
    assert saved["train_seconds"] > 0
    assert set(saved["test"]) >= {"accuracy", "macro_f1"}
    assert summary["test"] == saved["test"]


def test_best_checkpoint_is_self_contained_for_inference(tiny_recipe, tmp_path):
    train(tiny_recipe, tmp_path / "run")
    model, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "best")
    assert meta["classes"] == ["circle", "square", "stripes"]
    assert meta["backbone"] == "test_resnet" and meta["head"]["name"] == "spinal"
    assert meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert {"accuracy", "macro_f1"} <= set(meta["metrics"])
    assert meta["recipe"]["model"]["backbone"] == "test_resnet"
    assert {"finetune", "torch", "timm"} <= set(meta["versions"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_best_is_chosen_by_the_selected_metric(tiny_recipe, tmp_path):
    tiny_recipe["training"]["select"] = "loss"
    train(tiny_recipe, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    losses = [float(r["val_loss"]) for r in rows]
    assert summary["best_epoch"] == 1 + losses.index(min(losses))
    assert summary["best_metric"]["value"] == pytest.approx(min(losses), rel=1e-5)


def test_head_stage_freezes_backbone_weights_and_batchnorm_statistics(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"name": "head", "epochs": 2, "train": "head", "feature_cache": False}]
    tiny_recipe["output"] = {"evaluate_test": False}
    recipe = parse_recipe(tiny_recipe)
    from finetune.models import create_model

    torch.manual_seed(0)
    run = tmp_path / "run"
    train(tiny_recipe, run)
    after = read_weights(run / "checkpoints" / "last")
    # the run seeds 0 before creating the model: rebuild the same initial weights
    torch.manual_seed(recipe.training.seed)
    before = create_model("test_resnet", 3, head=recipe.model.head).state_dict()
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)
    for k in backbone_keys:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("head."))


def test_unchanged_model_run_is_reproducible_with_a_fixed_seed(tiny_recipe, tmp_path):
    tiny_recipe["output"] = {"evaluate_test": False}
    train(tiny_recipe, tmp_path / "a")
    train(tiny_recipe, tmp_path / "b")
    a = read_weights(tmp_path / "a" / "checkpoints" / "last")
    b = read_weights(tmp_path / "b" / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_epoch_stage_is_skipped_and_early_stopping_stops_when_patience_runs_out(tiny_recipe, tmp_path):
    """With EMA, accumulation and clipping on (their effects: test_loop.py, test_loop_options.py)."""
    tiny_recipe["stages"].insert(1, {"name": "none", "epochs": 0, "train": "all"})
    tiny_recipe["stages"][-1]["epochs"] = 4
    tiny_recipe["training"].update({"ema": 0.9, "accumulation": 2, "clip_grad": 1.0, "early_stopping": 1,
                                    "label_smoothing": 0.1, "select": "macro_f1"})
    tiny_recipe["output"] = {"evaluate_test": False}
    train(tiny_recipe, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert {int(r["stage"]) for r in rows} == {0, 2}
    # patience 1 on the stage's own best macro-F1: the stage ends at its first epoch that does not beat it
    values = [float(r["val_macro_f1"]) for r in rows if r["stage"] == "2"]
    stale = [j for j in range(1, 4) if values[j:j + 1] and values[j] <= max(values[:j])]
    assert len(values) == (stale[0] + 1 if stale else 4), values


def test_existing_run_folder_is_not_overwritten(tiny_recipe, tmp_path):
    tiny_recipe["output"] = {"evaluate_test": False}
    tiny_recipe["stages"] = tiny_recipe["stages"][:1]
    train(tiny_recipe, tmp_path / "run")
    before = (tmp_path / "run" / "metrics.csv").read_text()
    with pytest.raises(FinetuneError, match="already holds a run"):
        train(tiny_recipe, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").read_text() == before


def test_non_finite_loss_stops_naming_stage_epoch_step_and_keeps_last_checkpoint(tiny_recipe, tmp_path):
    tiny_recipe["output"] = {"evaluate_test": False}
    tiny_recipe["stages"][1]["optimizer"] = {"lr": 1e30, "name": "momentum"}
    run = tmp_path / "run"
    with pytest.raises(FinetuneError, match=r"non-finite loss at stage 1 \(all\), epoch \d+, step \d+"):
        train(tiny_recipe, run)
    state = read_weights(run / "checkpoints" / "last")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(int(r["stage"]) == 0 or float(r["train_loss"]) == float(r["train_loss"]) for r in read_metrics(run))


def test_train_without_recipe_uses_staged_defaults(tiny_folder, tmp_path):
    from finetune.cli import main
    from finetune.models import create_model

    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_folder), "--backbone", "test_resnet", "--head", "linear",
                 "--out", str(run), "--quiet", "--set", "data.input_size=32", "--set", "data.num_workers=0",
                 "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1",
                 "--set", f"training.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    assert [r["stage"] for r in read_metrics(run)] == ["0", "1"]
    # the head stage cached one view of the train transform (not the eval transform's features)
    (meta,) = (tmp_path / "cache" / "features").glob("*/meta.json")
    assert json.loads(meta.read_text())["settings"]["views"] == 1
    # 'all' trained the backbone with its BatchNorm statistics frozen (batchnorm: eval)
    torch.manual_seed(0)
    fresh = create_model("test_resnet", 3, head="linear").state_dict()
    trained = read_weights(run / "checkpoints" / "last")
    stats = [k for k in fresh if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], fresh[k]) for k in stats)
    convs = [k for k in fresh if k.startswith("backbone.") and k.endswith("conv1.weight")]
    assert convs and not all(torch.equal(trained[k], fresh[k]) for k in convs)  # while the weights moved


def test_default_recipe_stage_settings():
    """The no-recipe stages: augmented cached head features, warmed-up lrs, frozen BatchNorm statistics once
    the backbone trains and a warmed-up EMA of the weights (the stage-transition fixes of issue 12)."""
    from finetune.cli.train import default_recipe
    from finetune.config import resolve_raw

    resolved = resolve_raw(default_recipe("data", "test_resnet", "spinal", "false"))
    stages = resolved["stages"]
    assert resolved["training"]["ema"] == 0.999 and resolved["training"]["ema_warmup"] is True
    assert [(s["name"], s["train"]) for s in stages] == [("head", "head"), ("all", "all")]
    assert stages[0]["feature_cache_views"] == 1 and stages[0]["optimizer"]["lr"] == 1e-3
    assert stages[1]["batchnorm"] == "eval"
    assert [s["epochs"] for s in stages] == [3, 7] and all(s["schedule"]["warmup_epochs"] == 1 for s in stages)
    assert stages[1]["optimizer"]["lr"] == 1e-3 and stages[1]["optimizer"]["layer_decay"] == 0.8


def test_store_n_trains_from_pixels_shrunk_once_and_a_second_run_decodes_nothing(tiny_recipe, tmp_path, monkeypatch):
    import numpy as np

    from finetune.data import store as store_module

    tiny_recipe["data"]["store"] = 20
    tiny_recipe["output"] = {"evaluate_test": False}
    train(tiny_recipe, tmp_path / "run")
    stores = [f.parent for f in (tmp_path / "cache" / "store").rglob("meta.json")]
    index = np.concatenate([np.load(f / "index.npy") for f in stores])
    assert len(index) == 27  # train + val images of the 36-image folder
    assert (np.minimum(index["height"], index["width"]) == 20).all()

    decoded = []
    monkeypatch.setattr(store_module, "_stored_image", lambda *a, **k: decoded.append(a) or 1 / 0)
    monkeypatch.setattr("finetune.data.datasets.load_image", lambda *a, **k: 1 / 0)  # no epoch reads a file
    train(tiny_recipe, tmp_path / "run2")
    assert decoded == []


def test_progress_bars_track_epochs_and_report_loss_lr_and_images_per_second(capsys):
    from finetune.training.reporting import Progress

    progress = Progress(True, total_epochs=3, done_epochs=1)
    with progress.epoch("head 1/2", total=4) as update:
        update(2, 64, 0.5, 1e-3)
        update(4, 128, 0.4, 1e-3)
    progress.close()
    err = capsys.readouterr().err
    assert progress.overall.n == 2
    assert "loss=0.4000" in err and "lr=1.00e-03" in err and "img_s=" in err
    with Progress(False, 3, 0).epoch("quiet", 4) as update:
        assert update is None


@pytest.mark.parametrize("balance", ["loss", "sampler"])
def test_class_balancing_by_weighted_loss_or_balanced_sampler_trains(tiny_recipe, tmp_path, balance):
    tiny_recipe["data"]["balance"] = balance
    tiny_recipe["output"] = {"evaluate_test": False}
    tiny_recipe["stages"] = tiny_recipe["stages"][1:]
    train(tiny_recipe, tmp_path / "run")
    assert len(read_metrics(tmp_path / "run")) == 2


def test_data_loader_workers_see_each_new_epoch(tiny_recipe, tmp_path):
    """With persistent workers, augmentation still changes from epoch to epoch (same seed → same run)."""
    tiny_recipe["data"]["num_workers"] = 2
    tiny_recipe["data"]["train_transforms"] = [{"name": "RandomResizedCrop", "size": [32, 32], "scale": [0.3, 1.0]}]
    tiny_recipe["stages"] = [{"name": "all", "epochs": 2, "train": "all"}]
    tiny_recipe["output"] = {"evaluate_test": False}
    train(tiny_recipe, tmp_path / "a")
    tiny_recipe["data"]["num_workers"] = 0
    train(tiny_recipe, tmp_path / "b")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # worker count doesn't matter


def test_progress_lines_go_to_the_stderr_a_program_has_when_it_logs():
    """A program (or notebook, or in-process CLI test) that redirects stderr after its first run still gets
    the epoch lines: the handler used to keep the stderr of the first run's moment."""
    import contextlib
    import io
    import logging

    from finetune.training.reporting import setup_logging

    setup_logging(True)
    for _ in range(2):  # the second redirect is the one the old handler missed
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            setup_logging(True)
            logging.getLogger("finetune").info("epoch 1/1")
        assert buf.getvalue() == "epoch 1/1\n"
