"""Test-time augmentation: the views, the averaged probabilities, and TTA metrics beside the plain ones."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune.cli import main
from finetune.config import parse_recipe
from finetune.data import load_image
from finetune.errors import FinetuneError
from finetune.evaluation import classification_metrics, evaluate
from finetune.data.transforms import preprocessing_transform
from finetune.inference.predictor import load
from finetune.inference.tta import views


class LeftNet(nn.Module):
    """Logits are 4 × each channel's mean over the left half: a mirror image can change the class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * x[..., : x.shape[-1] // 2].mean(dim=(2, 3))


def _two_tone(path, left, right):
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:] = left, right
    Image.fromarray(pixels).save(path)
    return path


def test_views_are_the_image_its_mirror_and_its_corner_crops():
    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)

    flip = views(image, "hflip")
    crops = views(image, "crops")
    both = views(image, "hflip+crops")

    assert len(flip) == 2 and (flip[0] == image).all() and (flip[1] == image[:, ::-1]).all()
    assert len(crops) == 5 and (crops[0] == image).all()
    assert [c.shape[:2] for c in crops[1:]] == [(9, 18)] * 4
    assert (crops[1] == image[:9, :18]).all() and (crops[4] == image[1:, 2:]).all()
    assert len(both) == 10 and all((b == c[:, ::-1]).all() for b, c in zip(both[5:], crops))
    with pytest.raises(FinetuneError, match="unknown test-time augmentation 'rot90'"):
        views(image, "rot90")


def test_hflip_tta_predicts_the_mean_of_the_two_views_softmax(checkpoint, tmp_path):
    path = _two_tone(tmp_path / "a.png", (230, 30, 30), (30, 30, 230))
    predictor = load(checkpoint)
    transform = preprocessing_transform(predictor.preprocessing)
    image = load_image(path)
    with torch.no_grad():
        both = torch.stack([transform(image=image)["image"], transform(image=np.ascontiguousarray(image[:, ::-1]))["image"]])
        expected = predictor.model(both).softmax(1).mean(0)

    plain = predictor.predict(path, topk=3)
    tta = predictor.predict(path, topk=3, tta="hflip")

    order = expected.argsort(descending=True)
    assert tta.labels == [predictor.classes[i] for i in order]
    np.testing.assert_allclose(tta.probabilities, expected[order].numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(np.array(plain.probabilities) - np.array(tta.probabilities)).max() > 1e-5  # the views differ
    with pytest.raises(FinetuneError, match="unknown test-time augmentation"):
        predictor.predict(path, tta="rot90")


def test_evaluate_reports_metrics_with_and_without_tta(tmp_path, preprocessing):
    # red|blue images of class cat (0) and blue|red images of fox (2): LeftNet gets each plain view right,
    # and the mirror view wrong, so TTA averages to a tie-free but less confident (and different) answer
    root = tmp_path / "images"
    items = []
    for i in range(3):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        (root / "fox").mkdir(parents=True, exist_ok=True)
        items.append((_two_tone(root / "cat" / f"{i}.png", (230, 30, 30), (30 + 60 * i, 30, 200)), 0))
        items.append((_two_tone(root / "fox" / f"{i}.png", (30, 30, 230), (200, 30, 30 + 60 * i)), 2))
    model = LeftNet()

    metrics = evaluate(model, items, class_names=["cat", "dog", "fox"], preprocessing=preprocessing,
                       out_dir=tmp_path / "eval", explain=False, tta="hflip")

    transform = preprocessing_transform(preprocessing)
    with torch.no_grad():
        probs = []
        for path, _ in items:
            image = load_image(path)
            pair = torch.stack([transform(image=image)["image"], transform(image=np.ascontiguousarray(image[:, ::-1]))["image"]])
            probs.append(model(pair).softmax(1).mean(0).numpy())
    expected = classification_metrics([t for _, t in items], np.array(probs), class_names=["cat", "dog", "fox"])
    assert metrics["accuracy"] == 1.0
    assert metrics["tta"]["views"] == "hflip"
    assert metrics["tta"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["tta"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["tta"]["loss"] > metrics["loss"]  # the mirror views pull the right class down
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["tta"] == pytest.approx(metrics["tta"]) and written["accuracy"] == 1.0
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Test-time augmentation (hflip)" in report and "without TTA" in report and "with TTA" in report


def test_eval_and_predict_commands_take_tta(checkpoint, image_folder, tmp_path, capsys):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    assert main(["eval", str(ckpt), "--data", str(image_folder), "--split", "all", "--out", str(tmp_path / "ev"),
                 "--tta", "crops", "--no-explain", "--num-workers", "0"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["tta"]["views"] == "crops" and metrics["tta"]["num_samples"] == metrics["num_samples"] == 12
    assert "with crops TTA: accuracy" in capsys.readouterr().out

    image = sorted(image_folder.rglob("*.png"))[0]
    out = tmp_path / "p.json"
    assert main(["predict", str(ckpt), str(image), "--tta", "hflip+crops", "--topk", "3", "--out", str(out)]) == 0
    expected = load(ckpt).predict(image, topk=3, tta="hflip+crops")
    got = json.loads(out.read_text())[0]["predictions"]
    np.testing.assert_allclose([p["probability"] for p in got], expected.probabilities, rtol=1e-6)


def test_recipe_evaluation_tta_is_validated(tiny_recipe):
    tiny_recipe["evaluation"] = {"tta": "hflip"}
    assert parse_recipe(tiny_recipe).evaluation.tta == "hflip"
    tiny_recipe["evaluation"] = {"tta": "rot90"}
    with pytest.raises(FinetuneError, match="evaluation.tta"):
        parse_recipe(tiny_recipe)
