"""Temperature scaling: fitted on logits, stored in the checkpoint, applied by predict, eval and exports."""
import json
import shutil

import numpy as np
import pytest
import torch

from finetune.inference.temperature import fit_temperature, meta_temperature, softmax
from finetune.cli import main
from finetune.data import load_image
from finetune.errors import FinetuneError
from finetune.evaluation import evaluate, expected_calibration_error
from finetune.evaluation.calibrate import calibrate_checkpoint, set_temperature
from finetune.data.transforms import preprocessing_transform
from finetune.inference.predictor import load


def _overconfident(scale=5.0, n=3000, classes=5, seed=0):
    """Labels drawn from softmax(z) (calibrated logits z) and the over-confident logits scale × z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, classes))
    p = softmax(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return scale * z, labels


def test_an_overconfident_model_gets_its_scale_back_and_its_ece_drops():
    logits, labels = _overconfident(scale=5.0)

    temperature = fit_temperature(logits, labels)

    assert temperature == pytest.approx(5.0, rel=0.1)
    before = expected_calibration_error(labels, softmax(logits))
    after = expected_calibration_error(labels, softmax(logits, temperature))
    assert after < before / 3
    assert (softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()  # classes unchanged


def test_calibrated_checkpoint_is_applied_by_the_predictor_and_predict(checkpoint, image_folder, tmp_path):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    items = [(p, ["cat", "dog", "fox"].index(p.parent.name)) for p in sorted(image_folder.rglob("*.png"))]

    result = calibrate_checkpoint(ckpt, items)

    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["temperature"] == result["temperature"] != 1.0
    assert result["loss_after"] <= result["loss_before"] + 1e-9
    predictor = load(ckpt)
    assert predictor.temperature == result["temperature"]
    transform = preprocessing_transform(predictor.preprocessing)
    with torch.no_grad():
        logits = predictor.model(torch.stack([transform(image=load_image(p))["image"] for p, _ in items])).numpy()
    expected = softmax(logits, result["temperature"])
    for pred, row in zip(predictor.predict([p for p, _ in items], topk=3), expected):
        np.testing.assert_allclose(pred.probabilities, np.sort(row)[::-1], rtol=1e-5, atol=1e-6)
    assert [p.label for p in predictor.predict([p for p, _ in items])] == [
        predictor.classes[i] for i in logits.argmax(1)]  # the argmax of the raw logits
    assert not predictor.model.training  # the temperature wrapper left the model in eval mode


def test_evaluate_shows_ece_before_and_after_and_keeps_accuracy(colour_net, image_folder, preprocessing, tmp_path):
    items = [(p, ["cat", "dog", "fox"].index(p.parent.name)) for p in sorted(image_folder.rglob("*.png"))]
    kwargs = dict(class_names=["cat", "dog", "fox"], preprocessing=preprocessing, explain=False)

    plain = evaluate(colour_net, items, out_dir=tmp_path / "plain", **kwargs)
    scaled = evaluate(colour_net, items, out_dir=tmp_path / "scaled", temperature=0.25, **kwargs)

    assert "calibration" not in plain
    assert scaled["accuracy"] == plain["accuracy"] and scaled["macro_f1"] == plain["macro_f1"]
    assert scaled["calibration"]["temperature"] == 0.25
    assert scaled["calibration"]["ece_before"] == pytest.approx(plain["ece"])
    assert scaled["calibration"]["ece_after"] == scaled["ece"] != plain["ece"]
    assert json.loads((tmp_path / "scaled" / "metrics.json").read_text())["calibration"] == scaled["calibration"]
    report = (tmp_path / "scaled" / "report.html").read_text()
    assert "Calibration (temperature 0.2500)" in report and "Reliability diagram" in report
    assert (tmp_path / "scaled" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_onnx_export_divides_the_logits_by_the_temperature(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from finetune.models.checkpoint import load_checkpoint
    from finetune.deploy.export import export_model
    from finetune.deploy.onnx import metadata_path

    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    set_temperature(ckpt, 2.5)
    path = export_model(ckpt, format="onnx", out=tmp_path / "model.onnx")

    batch = torch.randn(3, 3, 32, 32)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": batch.numpy()})
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        expected = model(batch) / 2.5
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
    assert json.loads(metadata_path(path).read_text())["temperature"] == 2.5


def test_torchscript_export_divides_the_logits_by_the_temperature(checkpoint, tmp_path):
    from finetune.models.checkpoint import load_checkpoint
    from finetune.deploy.export import export_model
    from finetune.deploy.onnx import metadata_path

    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    set_temperature(ckpt, 2.5)
    path = export_model(ckpt, format="torchscript", out=tmp_path / "model.pt")
    batch = torch.randn(3, 3, 32, 32)
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        got, expected = torch.jit.load(str(path))(batch), model(batch)
    torch.testing.assert_close(got, expected / 2.5, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, expected, atol=1e-3)  # divided, not the raw logits
    assert json.loads(metadata_path(path).read_text())["temperature"] == 2.5


def test_calibrate_command_stores_the_temperature(checkpoint, image_folder, tmp_path, capsys):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")

    assert main(["calibrate", str(ckpt), "--data", str(image_folder), "--split", "all", "--num-workers", "0"]) == 0

    temperature = json.loads((ckpt / "checkpoint.json").read_text())["temperature"]
    assert f"temperature {temperature:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("value", [0, -1.0, "2", float("nan"), True])
def test_a_bad_temperature_in_the_checkpoint_is_refused(value):
    with pytest.raises(FinetuneError, match="temperature must be a positive number"):
        meta_temperature({"temperature": value})
