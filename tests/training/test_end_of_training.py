"""The end of a run: the best checkpoint calibrated on the val split, the test split evaluated with and
without test-time augmentation."""
import json

from finetune.config import parse_recipe
from finetune.inference.predictor import load
from finetune.training.runner import run_training


def test_run_calibrates_the_best_checkpoint_and_reports_tta_beside_plain_metrics(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": False}]
    tiny_recipe["evaluation"] = {"tta": "hflip"}
    run_dir = tmp_path / "run"

    summary = run_training(parse_recipe(tiny_recipe), tiny_recipe, run_dir=run_dir, quiet=True)

    temperature = json.loads((run_dir / "checkpoints" / "best" / "checkpoint.json").read_text())["temperature"]
    assert summary["calibration"]["temperature"] == temperature != 1.0
    assert load(run_dir).temperature == temperature
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == temperature
    assert metrics["tta"]["views"] == "hflip" and metrics["tta"]["num_samples"] == metrics["num_samples"]
    assert summary["test"]["tta"] == metrics["tta"] and summary["test"]["accuracy"] == metrics["accuracy"]
    assert "with TTA" in (run_dir / "eval" / "report.html").read_text()


def test_calibration_can_be_switched_off(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": False}]
    tiny_recipe["evaluation"] = {"calibrate": False}
    tiny_recipe["output"] = {"evaluate_test": False}

    summary = run_training(parse_recipe(tiny_recipe), tiny_recipe, run_dir=tmp_path / "run", quiet=True)

    assert "calibration" not in summary and "test" not in summary
    assert "temperature" not in json.loads((tmp_path / "run" / "checkpoints" / "best" / "checkpoint.json").read_text())
