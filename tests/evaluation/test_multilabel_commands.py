"""Multi-label checkpoints through every command (issue 25, parts 3-5): eval (mAP, tables, PR curves, report.html),
calibrate (per-label temperatures), explain --label, export (sigmoid probabilities and thresholds), eval of the
ONNX export. One small run of the digit mosaics, trained once for the module."""
import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from finetune.cli import main
from finetune.config import parse_recipe
from finetune.training.runner import Runner

from tests.conftest import TINY_RECIPE
from tests.training.test_multilabel_training import DIGITS, write_mosaics

pytestmark = pytest.mark.slow
CLASSES = [f"d{d}" for d in range(DIGITS)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, labels CSV) of a multi-label run whose best checkpoint has tuned thresholds, uncalibrated."""
    tmp = tmp_path_factory.mktemp("ml")
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(write_mosaics(tmp / "mosaics", n=80))
    raw["data"].update(val=0.25, test=0.25)
    raw["stages"] = [{"name": "all", "epochs": 3, "train": "all", "optimizer": {"lr": 3e-3}}]
    raw["training"]["cache_dir"] = str(tmp / "cache")
    raw["evaluation"] = {**raw.get("evaluation", {}), "calibrate": False}
    runner = Runner(parse_recipe(raw), raw, run_dir=tmp / "run", resume=False, quiet=True)
    runner.setup()
    try:
        runner.train()
    finally:
        runner.cleanup()
    return tmp / "run", raw["data"]["root"]


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run, for the commands that change its checkpoint."""
    run_dir, labels = trained
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", labels


def _meta(run_dir):
    return json.loads((run_dir / "checkpoints" / "best" / "checkpoint.json").read_text())


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_of_a_multilabel_checkpoint_writes_its_files_and_map_equals_sklearns_on_predictions_csv(trained, tmp_path, capsys):
    run_dir, labels = trained
    out = tmp_path / "ev"
    assert main(["eval", str(run_dir), "--data", labels, "--out", str(out), "--num-workers", "0"]) == 0
    assert "mAP" in capsys.readouterr().out
    for name in ("metrics.json", "per_class.csv", "predictions.csv", "confused_pairs.csv", "errors.csv",
                 "pr_curves.png", "report.html"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    rows = _read(out / "predictions.csv")
    manifest = _read(run_dir / "manifest.csv")
    assert len(rows) == metrics["num_samples"] == sum(r["split"] == "test" for r in manifest)
    y = np.array([[c in r["labels"].split(";") for c in CLASSES] for r in rows], dtype=int)
    p = np.array([[float(r[f"p:{c}"]) for c in CLASSES] for r in rows])
    present = y.sum(0) > 0
    assert metrics["map_macro"] == pytest.approx(average_precision_score(y[:, present], p[:, present], average="macro"))
    assert metrics["map_micro"] == pytest.approx(average_precision_score(y, p, average="micro"))
    # the predicted labels are those at or above the checkpoint's per-label thresholds
    thresholds = np.array(_meta(run_dir)["thresholds"])
    assert [r["predicted"] for r in rows] == [";".join(c for c, on in zip(CLASSES, row >= thresholds) if on) for row in p]
    per_class = {r["class"]: r for r in _read(out / "per_class.csv")}
    for c, name in enumerate(CLASSES):
        predicted = p[:, c] >= thresholds[c]
        assert int(per_class[name]["tp"]) == int((predicted & (y[:, c] == 1)).sum())
        assert int(per_class[name]["fp"]) == int((predicted & (y[:, c] == 0)).sum())
        assert float(per_class[name]["threshold"]) == pytest.approx(thresholds[c], abs=1e-6)
    errors = _read(out / "errors.csv")
    assert len(errors) == sum(int(per_class[n]["fp"]) + int(per_class[n]["fn"]) for n in CLASSES)
    html = (out / "report.html").read_text()
    for section in ("summary", "per-label", "pr-curves", "confused-pairs", "false-positives", "false-negatives"):
        assert f'id="{section}"' in html
    assert (out / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_tta_for_a_multilabel_checkpoint_in_one_line_writing_nothing(trained, tmp_path, capsys):
    run_dir, labels = trained
    assert main(["eval", str(run_dir), "--data", labels, "--out", str(tmp_path / "ev"), "--tta", "hflip"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tta" in err and "multi-label" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()


def _val(run_dir, labels):
    from finetune.data.multilabel import read_labels_csv

    table = read_labels_csv(run_dir / "manifest.csv", root=Path(labels).parent)
    items = table.items("val")
    return [str(p) for p, _ in items], np.stack([t for _, t in items]).astype(int)


def test_calibrate_fits_per_label_temperatures_lowers_val_loss_and_keeps_the_predicted_labels(run_copy, capsys):
    from finetune.inference.predictor import load

    run_dir, labels = run_copy
    paths, y = _val(run_dir, labels)
    before = load(run_dir / "checkpoints" / "best")
    capsys.readouterr()
    assert main(["calibrate", str(run_dir), "--data", labels, "--num-workers", "0"]) == 0
    assert "temperature" in capsys.readouterr().out
    meta = _meta(run_dir)
    assert len(meta["temperatures"]) == DIGITS and all(t > 0 for t in meta["temperatures"])
    after = load(run_dir / "checkpoints" / "best")
    # the thresholds moved with the temperatures: the same labels are predicted
    assert [set(p.labels) for p in after.predict(paths)] == [set(p.labels) for p in before.predict(paths)]

    def probabilities(predictor):
        return np.array([[dict(zip(r.labels, r.probabilities))[c] for c in CLASSES]
                         for r in predictor.predict(paths, threshold=0.0)])

    p0, p1 = probabilities(before), probabilities(after)
    assert not np.allclose(p0, p1)
    bce = [float(-(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)).mean()) for p in (p0, p1)]
    assert bce[1] <= bce[0] + 1e-9  # fitted to minimise exactly this on these images


def test_explain_takes_a_label_of_a_multilabel_checkpoint(trained, tmp_path):
    run_dir, labels = trained
    paths, _ = _val(run_dir, labels)
    assert main(["explain", str(run_dir), *paths[:2], "--label", "d2", "--out", str(tmp_path / "cam")]) == 0
    records = json.loads((tmp_path / "cam" / "explanations.json").read_text())
    assert [r["explained"] for r in records] == ["d2", "d2"]
    from finetune.inference.predictor import load

    predictions = load(run_dir / "checkpoints" / "best").predict(paths[:2])
    for r, prediction in zip(records, predictions):  # the labels listed are those predict gives at the thresholds
        assert 0 <= r["explained_probability"] <= 1
        assert set(r["labels"]) == set(prediction.labels)
    assert (tmp_path / "cam" / records[0]["overlay"]).is_file()


def test_explain_of_a_calibrated_multilabel_checkpoint_shows_predicts_probabilities(run_copy, tmp_path):
    run_dir, labels = run_copy
    best = run_dir / "checkpoints" / "best"
    meta = _meta(run_dir)
    meta["temperatures"] = [0.25 + 0.5 * i for i in range(len(meta["classes"]))]  # one per label, all different
    (best / "checkpoint.json").write_text(json.dumps(meta))
    paths, _ = _val(run_dir, labels)
    assert main(["explain", str(run_dir), *paths[:2], "--label", "d2", "--out", str(tmp_path / "cam")]) == 0
    records = json.loads((tmp_path / "cam" / "explanations.json").read_text())
    from finetune.inference.predictor import load

    for r, prediction in zip(records, load(best).predict(paths[:2], threshold=0.0)):
        assert r["explained_probability"] == pytest.approx(dict(zip(prediction.labels, prediction.probabilities))["d2"],
                                                           abs=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_outputs_the_checkpoints_sigmoid_probabilities_with_its_thresholds(run_copy, fmt, tmp_path):
    run_dir, labels = run_copy
    assert main(["calibrate", str(run_dir), "--data", labels, "--num-workers", "0"]) == 0
    from finetune.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(run_dir / "checkpoints" / "best")
    out = tmp_path / f"m.{ {'onnx': 'onnx', 'torchscript': 'pt', 'safetensors': 'safetensors'}[fmt] }"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    info = json.loads(out.with_name(out.name + ".json").read_text())
    assert info["task"] == "multilabel" and info["thresholds"] == meta["thresholds"]
    assert info["temperatures"] == meta["temperatures"]
    x = torch.randn(3, *meta["preprocessing"]["input_size"])
    with torch.no_grad():
        logits = model(x)
    expected = torch.sigmoid(logits / torch.tensor(meta["temperatures"]))
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["probabilities"] == [info["output"]["name"]]
        got = torch.from_numpy(session.run(["probabilities"], {"input": x.numpy()})[0])
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        from safetensors.torch import load_file

        from finetune.models import create_model

        rebuilt = create_model(info["backbone"], info["num_classes"], head=info["head"], pretrained=False)
        rebuilt.load_state_dict(load_file(str(out)))
        got = rebuilt.eval()(x)
        assert info["output"]["name"] == "logits" and "temperatures" in info["output"]["description"]
        expected = logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_eval_of_the_onnx_export_matches_the_checkpoints_map(trained, tmp_path, capsys):
    run_dir, labels = trained
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--data", labels, "--out", str(tmp_path / "ev"), "--num-workers", "0",
                 "--reference", str(run_dir)]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel"
    assert metrics["reference"]["map_macro_delta"] == pytest.approx(0.0, abs=1e-4)
    checkpoint = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["map_macro"] == pytest.approx(checkpoint["map_macro"], abs=1e-4)


def test_eval_of_data_with_a_label_the_checkpoint_lacks_is_one_line_naming_it_and_writes_nothing(trained, tmp_path, capsys):
    run_dir, labels = trained
    shutil.copytree(Path(labels).parent, tmp_path / "data")
    rows = _read(labels)
    rows[0]["labels"] += ";zebra"
    with open(tmp_path / "data" / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows([(r["path"], r["labels"], "test") for r in rows])
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "data" / "labels.csv"), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown label 'zebra' in the test split" in err and rows[0]["path"] in err
    assert not (tmp_path / "ev").exists()


def test_train_data_folder_with_labels_csv_trains_multilabel(tmp_path, monkeypatch):
    from finetune.cli import train as train_cli

    labels = write_mosaics(tmp_path / "images", n=40)
    # the labels CSV may live anywhere: its paths are relative to --data
    moved = tmp_path / "elsewhere" / "tags.csv"
    moved.parent.mkdir()
    labels.rename(moved)
    raw = train_cli.default_recipe(str(tmp_path / "images"), "test_resnet", "linear", "false", str(moved))
    assert raw["data"]["root"] == str(tmp_path / "images") and raw["data"]["manifest"] == str(moved)
    seen = {}

    def fake_run_training(recipe, raw, *, run_dir, quiet):
        seen.update(recipe=recipe, run_dir=run_dir)

    import finetune.training.runner as runner_module

    monkeypatch.setattr(runner_module, "run_training", fake_run_training)
    assert main(["train", "--data", str(tmp_path / "images"), "--labels", str(moved), "--backbone", "test_resnet",
                 "--out", str(tmp_path / "run")]) == 0
    assert seen["recipe"].data.root == str(tmp_path / "images") and seen["recipe"].data.manifest == str(moved)


@pytest.mark.parametrize("argv, message", [
    (["--labels", "tags.csv", "--backbone", "test_resnet"], "give --data too"),
    (["--data", ".", "--labels", "missing.csv", "--backbone", "test_resnet"], "--labels missing.csv: no such file"),
    (["recipe.yaml", "--labels", "tags.csv"], "give either a recipe or --data/--backbone/--labels"),
])
def test_train_labels_misuse_is_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_int8_export_and_benchmark_of_a_multilabel_checkpoint(trained, tmp_path):
    from finetune.deploy.benchmark import benchmark

    run_dir, labels = trained
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--quantize", "int8", "--calibration", "8",
                 "--data", labels, "--out", str(out)]) == 0
    info = json.loads(out.with_name(out.name + ".json").read_text())
    assert info["task"] == "multilabel" and info["output"]["name"] == "probabilities"
    assert info["quantization"]["method"] == "static" and info["quantization"]["calibration_images"] == 8
    result = benchmark([run_dir], batches=[2], iterations=2, warmup=1, devices=["cpu"])
    assert {r["backend"] for r in result["rows"] if r["status"] == "ok"} >= {"pytorch eager", "onnxruntime fp32",
                                                                           "onnxruntime int8"}
    assert result["int8"].startswith("int8 dynamic")
    # with calibration images, the benchmark times the static int8 that export makes of a multi-label checkpoint
    result = benchmark([run_dir], batches=[2], iterations=2, warmup=1, devices=["cpu"], calibration=6, data=labels)
    assert {r["backend"] for r in result["rows"] if r["status"] == "ok"} >= {"onnxruntime fp32",
                                                                           "onnxruntime int8 static"}
    assert result["int8"].startswith("int8 static (as finetune export --quantize int8 makes it): 6 calibration")


def test_multilabel_defaults_are_one_stage_at_a_constant_lr_with_a_linear_head(tmp_path):
    from finetune.cli import train as train_cli
    from finetune.config import parse_recipe

    labels = tmp_path / "labels.csv"
    labels.write_text("path,labels\na.png,cat\nb.png,dog;cat\n")
    raw = train_cli.default_recipe(str(labels), "test_resnet", None, "false")
    recipe = parse_recipe(raw)  # a valid recipe
    (stage,) = recipe.stages
    assert (stage.name, stage.epochs, stage.train, stage.batchnorm) == ("all", 12, "all", "train")
    assert raw["stages"][0]["optimizer"]["lr"] == 2e-3 and raw["schedule"] == {"name": "constant"}
    assert recipe.training.ema is None and raw["model"]["head"] == "linear"
    spinal = train_cli.default_recipe(str(labels), "test_resnet", "spinal", "false")
    assert spinal["model"]["head"] == "spinal" and spinal["stages"][0]["optimizer"]["lr"] == 1e-3
    # single-label data keeps the staged defaults and the spinal head
    single = train_cli.default_recipe(str(tmp_path / "folder"), "test_resnet", None, "false")
    assert [s["name"] for s in single["stages"]] == ["head", "all"] and single["model"]["head"] == "spinal"


def test_the_end_of_a_calibrated_multilabel_run_reads_the_val_split_once_for_thresholds_and_temperatures(
        run_copy, monkeypatch):
    from finetune.evaluation import calibrate
    from finetune.inference.predictor import predict_probabilities
    from finetune.inference.temperature import fit_label_temperatures
    from finetune.training import reporting

    run_dir, labels = run_copy
    paths, y = _val(run_dir, labels)
    calls = []

    def counting(model, paths, *args, **kwargs):
        calls.append(predict_probabilities(model, paths, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(reporting, "predict_probabilities", counting)
    monkeypatch.setattr(calibrate, "predict_probabilities", counting)
    out = reporting.finish_multilabel(run_dir, list(zip(paths, y)), [], device="cpu", batch_size=16, num_workers=0,
                                      amp_dtype=None, calibrate=True)
    assert len(calls) == 1  # one forward of the val split serves the thresholds and the temperatures
    indices, logits, _ = calls[0]
    assert len(indices) == len(paths)
    stored = _meta(run_dir)
    expected = fit_label_temperatures(logits, y[indices])
    assert stored["temperatures"] == pytest.approx(expected.tolist())
    assert out["calibration"]["temperatures"] == stored["temperatures"]
    assert out["calibration"]["num_samples"] == len(indices)
    # the thresholds moved to the calibrated scale: the same logit cut, so the same labels are predicted
    assert out["thresholds"]["per_class"] == stored["thresholds"] and out["thresholds"]["scale"] == "calibrated"
    tuned, moved = (np.clip(np.array(t), 1e-12, 1 - 1e-12)
                    for t in (out["thresholds"]["per_class_uncalibrated"], stored["thresholds"]))
    assert np.log(moved / (1 - moved)) * expected == pytest.approx(np.log(tuned / (1 - tuned)), rel=1e-6, abs=1e-9)
    assert not np.allclose(moved, tuned)
