"""Grad-CAM (`finetune.evaluation.explain`): it localises, for CNNs and ViTs; the report and `finetune explain`."""
import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.models.checkpoint import load_checkpoint
from finetune.evaluation import evaluate
from finetune.evaluation.explain import encode, explain_images, grad_cam, overlay
from finetune.evaluation.report import render_report
from finetune.inference.predictor import eval_transform
from finetune.models import create_model

FAMILIES = {
    # NCHW features of the last stage
    "cnn": ("test_resnet", {}),
    # NHWC features (output_fmt), as Swin's
    "nhwc": ("test_mambaout", {}),
    # class token pooled: the map is taken at the last block's input; non-square grid, 1 + 2 prefix tokens
    "vit-token": ("test_vit", {"img_size": (64, 96), "reg_tokens": 2}),
    # average-pooled tokens: the map is taken at the output of forward_features
    "vit-avg": ("test_vit", {"img_size": 64, "global_pool": "avg"}),
}


def _quadrant(height: int, width: int, quadrant: int) -> tuple[slice, slice]:
    row, col = divmod(quadrant, 2)
    return slice(row * height // 2, (row + 1) * height // 2), slice(col * width // 2, (col + 1) * width // 2)


def _planted(height: int, width: int, quadrant: int) -> torch.Tensor:
    """A blank (normalised 0) image with random texture in one quadrant."""
    x = torch.zeros(1, 3, height, width)
    rows, cols = _quadrant(height, width, quadrant)
    x[:, :, rows, cols] = torch.randn(1, 3, height // 2, width // 2, generator=torch.Generator().manual_seed(quadrant)) * 2
    return x


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grad_cam_peaks_in_the_quadrant_that_holds_the_class_evidence(family):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = create_model(name, 2, head="linear", **kwargs).eval()
    height, width = model.data_config()["input_size"][1:]
    for quadrant in range(4):  # all four: a flipped or transposed map lands in another quadrant
        x = _planted(height, width, quadrant)
        with torch.no_grad():  # class 0 reads exactly what the texture adds to the pooled features
            evidence = (model.backbone(x) - model.backbone(torch.zeros_like(x)))[0]
            model.head[1].weight.copy_(torch.stack([evidence, -evidence]))
            model.head[1].bias.zero_()
            expected = model(x).softmax(dim=1)

        probs, cams = grad_cam(model, x, [0])

        torch.testing.assert_close(probs, expected)  # forward_features + forward_head is the model
        assert cams.shape == (1, height, width) and float(cams.max()) == pytest.approx(1.0)
        means = [float(cams[0][_quadrant(height, width, q)].mean()) for q in range(4)]
        assert int(np.argmax(means)) == quadrant, f"{family}: quadrant means {means}, evidence in {quadrant}"


def test_explain_reads_files_shows_what_the_model_saw_and_reports_unreadable_ones(tmp_path, checkpoint):
    model, meta = load_checkpoint(checkpoint)
    pre = meta["preprocessing"]
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")

    results, errors = explain_images(model, [tmp_path / "red.png", tmp_path / "broken.png"], eval_transform(pre),
                                     mean=pre["mean"], std=pre["std"], targets=[2, 2])

    assert results[1] is None and set(errors) == {1}
    seen = results[0]
    assert seen.image.shape == (32, 32, 3) and seen.cam.shape == (32, 32) and seen.target == 2
    np.testing.assert_allclose(seen.image.reshape(-1, 3).mean(axis=0), (200, 30, 30), atol=2)  # denormalised
    assert seen.probabilities.shape == (3,) and seen.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_overlay_leaves_the_image_where_the_map_is_zero_and_colours_it_where_it_is_high():
    image = np.full((8, 8, 3), 128, dtype=np.uint8)
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[:4] = 1.0

    blended = overlay(image, cam)

    assert (blended[4:] == 128).all()
    assert np.abs(blended[:4].astype(int) - 128).max() > 60  # jet's dark red at 1.0


def _images(html: str, kind: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(rf'<img class="{kind}" alt="[^"]*" src="data:image/jpeg;base64,([^"]+)"', html)]


def test_report_shows_heat_maps_of_worst_mistakes_and_correct_predictions(tmp_path, checkpoint, image_folder):
    model, meta = load_checkpoint(checkpoint)
    classes = meta["classes"]
    items = [(p, i) for i, name in enumerate(classes) for p in sorted((image_folder / name).iterdir())]

    evaluate(model, items, class_names=classes, preprocessing=meta["preprocessing"], out_dir=tmp_path / "eval")
    evaluate(model, items, class_names=classes, preprocessing=meta["preprocessing"], out_dir=tmp_path / "plain",
             explain=False)

    html = (tmp_path / "eval" / "report.html").read_text()
    wrong = (tmp_path / "eval" / "misclassified.csv").read_text().count("\n") - 1
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    correct_classes = {name for name in classes if f"predicted: {name} (" in html.split('id="correct"')[1]}
    assert 0 < wrong < 12 and metrics["accuracy"] > 0  # the random model gets some right and some wrong
    heat_maps = _images(html, "heat-map")
    assert len(heat_maps) == wrong + len(correct_classes) and not _images(html, "image")
    assert all(im.size == (32, 32) for im in heat_maps)  # the 32-px model view (at most 128 px)
    assert "Grad-CAM of the predicted class" in html
    plain = (tmp_path / "plain" / "report.html").read_text()
    assert not _images(plain, "heat-map") and len(_images(plain, "image")) == len(heat_maps)


def test_report_of_225_classes_stays_small(tmp_path):
    """One correct prediction per class plus 24 mistakes, heat-maps of noise (JPEG's worst case) at 224 px."""
    rng = np.random.default_rng(0)
    pictures = [encode(overlay(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), rng.random((224, 224))))
                for _ in range(8)]
    items = [{"path": f"c{i}/0.jpg", "true": f"c{i}", "predicted": f"c{i}", "confidence": 0.9,
              "heatmap": pictures[i % 8]} for i in range(225 + 24)]

    html = render_report(title="225", metrics={"accuracy": 0.5}, per_class=[], most_confused=[],
                         misclassified=items[225:], correct=items[:225], confusion_figures=[])

    assert html.count('class="heat-map"') == 249
    assert Image.open(io.BytesIO(pictures[0])).size == (128, 128)
    assert len(html) < 249 * 12_000  # about 10 kB per thumbnail for noise; photos compress better


def test_cli_explain_writes_overlays_json_and_an_escaped_page(tmp_path, checkpoint, image_folder, capsys):
    from finetune.cli import main

    evil = image_folder / "<i>x"
    evil.mkdir()
    Image.new("RGB", (40, 40), (30, 30, 220)).save(evil / "blue.png")
    (evil / "broken.png").write_bytes(b"nope")
    out = tmp_path / "out"

    status = main(["explain", str(checkpoint), str(evil), str(image_folder / "cat" / "00.png"), "--out", str(out),
                   "--class", "fox", "--device", "cpu"])

    assert status == 0
    records = json.loads((out / "explanations.json").read_text())
    assert [r["path"].rsplit("/", 1)[1] for r in records] == ["blue.png", "broken.png", "00.png"]
    assert records[1]["error"] and records[1]["overlay"] is None
    for r in (records[0], records[2]):
        assert r["explained"] == "fox" and r["predicted"] in ("cat", "dog", "fox")
        assert Image.open(out / r["overlay"]).size == (32, 32)
    assert records[0]["overlay"] == "0000-blue.png" and records[2]["overlay"] == "0002-00.png"
    page = (out / "index.html").read_text()
    assert page.count('class="heat-map"') == 2 and "&lt;i&gt;x" in page and "<i>x" not in page
    assert "1 of 3 file(s) could not be read" in capsys.readouterr().out

    assert main(["explain", str(checkpoint), str(evil), "--out", str(out), "--class", "wolf"]) == 2
    assert "finetune explain: error: unknown class 'wolf'" in capsys.readouterr().err


def test_cli_explain_shows_the_calibrated_probabilities_predict_gives(tmp_path, checkpoint, image_folder):
    import shutil

    import finetune
    from finetune.cli import main

    calibrated = tmp_path / "calibrated"
    shutil.copytree(checkpoint, calibrated)
    meta = json.loads((calibrated / "checkpoint.json").read_text())
    meta["temperature"] = 4.0
    (calibrated / "checkpoint.json").write_text(json.dumps(meta))
    images = [str(image_folder / name / "00.png") for name in ("cat", "dog")]

    assert main(["explain", str(calibrated), *images, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0

    records = json.loads((tmp_path / "out" / "explanations.json").read_text())
    predicted = finetune.load(calibrated).predict(images)
    uncalibrated = finetune.load(checkpoint).predict(images)
    for record, p, raw in zip(records, predicted, uncalibrated):
        assert record["predicted"] == p.label
        assert record["probability"] == pytest.approx(p.probability, abs=1e-5)
        assert abs(raw.probability - p.probability) > 1e-3  # the temperature changes what predict shows
