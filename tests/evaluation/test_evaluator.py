import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, precision_score

from finetune.data import load_image
from finetune.errors import FinetuneError
from finetune.evaluation import align_classes, evaluate
from finetune.data.transforms import preprocessing_transform

RED, GREEN, BLUE = (220, 40, 40), (40, 200, 40), (40, 40, 220)
CLASSES = ["cat", "dog", "fox"]  # ColourNet: red → cat, green → dog, blue → fox
# One dog image is red and two fox images are green: ColourNet predicts cat and dog for them.
KNOWN = {"cat": [RED] * 4, "dog": [GREEN, GREEN, GREEN, RED], "fox": [BLUE, BLUE, GREEN, GREEN]}
Y_TRUE = [0] * 4 + [1] * 4 + [2] * 4
Y_PRED = [0, 0, 0, 0, 1, 1, 1, 0, 2, 2, 1, 1]


def items_of(root: Path, classes=CLASSES) -> list[tuple[Path, int]]:
    return [(p, i) for i, name in enumerate(classes) for p in sorted((root / name).iterdir())]


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture
def known_eval(tmp_path, write_images, colour_net, preprocessing):
    root = write_images(tmp_path / "images", KNOWN)
    out = tmp_path / "eval"
    metrics = evaluate(colour_net, items_of(root), class_names=CLASSES, preprocessing=preprocessing, out_dir=out)
    return root, out, metrics


def test_evaluate_writes_the_known_confusion_and_tables(known_eval):
    root, out, _ = known_eval

    assert read_csv(out / "confusion_matrix.csv") == [
        ["true\\predicted", "cat", "dog", "fox"], ["cat", "4", "0", "0"], ["dog", "1", "3", "0"], ["fox", "0", "2", "2"]
    ]
    per_class = read_csv(out / "per_class.csv")
    assert per_class[0] == ["class", "precision", "recall", "f1", "support", "top_confusion", "top_confusion_count"]
    assert [(r[0], r[4], r[5], r[6]) for r in per_class[1:]] == [
        ("cat", "4", "", "0"), ("dog", "4", "cat", "1"), ("fox", "4", "dog", "2")
    ]
    assert float(per_class[2][1]) == pytest.approx(3 / 5)  # dog precision: 3 of the 5 predicted dogs
    assert read_csv(out / "most_confused.csv") == [["true", "predicted", "count"], ["fox", "dog", "2"], ["dog", "cat", "1"]]
    wrong = read_csv(out / "misclassified.csv")
    assert wrong[0] == ["path", "true", "predicted", "confidence", "true_probability"]
    assert sorted((Path(r[0]).relative_to(root).as_posix(), r[1], r[2]) for r in wrong[1:]) == [
        ("dog/03.png", "dog", "cat"), ("fox/02.png", "fox", "dog"), ("fox/03.png", "fox", "dog")
    ]
    confidences = [float(r[3]) for r in wrong[1:]]
    assert confidences == sorted(confidences, reverse=True)
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert not (out / "confusion_matrix_top.png").exists()  # only for more than 30 classes
    assert "</html>" in (out / "report.html").read_text()


def test_evaluate_metrics_agree_with_scikit_learn(known_eval, colour_net, preprocessing):
    root, out, metrics = known_eval
    transform = preprocessing_transform(preprocessing)
    images = torch.stack([transform(image=load_image(p))["image"] for p, _ in items_of(root)])
    probs = colour_net(images).softmax(1).numpy()

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["num_samples"] == 12 and metrics["num_unreadable"] == 0
    assert metrics["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert metrics["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="weighted"))
    assert metrics["macro_precision"] == pytest.approx(precision_score(Y_TRUE, Y_PRED, average="macro"))
    assert metrics["top5_accuracy"] == 1.0
    assert metrics["loss"] == pytest.approx(log_loss(Y_TRUE, probs), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_with_bf16_autocast_gives_the_same_confusion(known_eval, tmp_path, colour_net, preprocessing):
    root, _, _ = known_eval

    evaluate(colour_net, items_of(root), class_names=CLASSES, preprocessing=preprocessing, out_dir=tmp_path / "cuda",
             device="cuda", amp_dtype=torch.bfloat16)

    assert read_csv(tmp_path / "cuda" / "confusion_matrix.csv")[1:] == [
        ["cat", "4", "0", "0"], ["dog", "1", "3", "0"], ["fox", "0", "2", "2"]
    ]


def test_evaluate_leaves_out_unreadable_images_and_lists_them(tmp_path, caplog, write_images, colour_net, preprocessing):
    root = write_images(tmp_path / "images", KNOWN)
    (root / "cat" / "broken.png").write_bytes(b"not a png")

    with caplog.at_level(logging.WARNING):
        metrics = evaluate(colour_net, items_of(root), class_names=CLASSES, preprocessing=preprocessing,
                           out_dir=tmp_path / "eval")

    assert metrics["num_samples"] == 12 and metrics["num_unreadable"] == 1
    assert metrics["unreadable"][0]["path"] == str(root / "cat" / "broken.png")
    assert "broken.png" in caplog.text
    assert "broken.png" in (tmp_path / "eval" / "report.html").read_text()


def test_evaluate_refuses_when_no_image_can_be_read(tmp_path, colour_net, preprocessing):
    (tmp_path / "a.png").write_bytes(b"")

    with pytest.raises(FinetuneError, match="none of the 1 images could be read"):
        evaluate(colour_net, [(tmp_path / "a.png", 0)], class_names=CLASSES, preprocessing=preprocessing,
                 out_dir=tmp_path / "eval")


def test_evaluate_refuses_a_model_whose_outputs_do_not_match_the_classes(known_eval, tmp_path, colour_net, preprocessing):
    root, _, _ = known_eval

    with pytest.raises(FinetuneError, match="the model gives 3 outputs for 4 classes"):
        evaluate(colour_net, items_of(root), class_names=[*CLASSES, "owl"], preprocessing=preprocessing,
                 out_dir=tmp_path / "other")


def test_evaluate_with_many_classes_adds_a_zoom_on_the_most_confused_block(tmp_path, write_images, preprocessing):
    classes = [f"class {i:02d}" for i in range(40)]
    rng = np.random.default_rng(0)
    root = write_images(tmp_path / "images", {name: [tuple(rng.integers(0, 256, 3))] for name in classes})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 40))

    evaluate(model, items_of(root, classes), class_names=classes, preprocessing=preprocessing, out_dir=tmp_path / "eval")

    full = Image.open(tmp_path / "eval" / "confusion_matrix.png")
    zoom = Image.open(tmp_path / "eval" / "confusion_matrix_top.png")
    assert full.width > 40 * 0.14 * 100  # at least 0.14 inch (14 px) per class
    assert zoom.format == "PNG"


def test_evaluate_averages_over_the_given_labels(known_eval, tmp_path, colour_net, preprocessing):
    root, _, everything = known_eval
    # Evaluate without fox images: averaging over cat and dog only leaves fox's zero precision out.
    items = [(p, t) for p, t in items_of(root) if t != 2]

    subset = evaluate(colour_net, items, class_names=CLASSES, preprocessing=preprocessing,
                      out_dir=tmp_path / "subset", labels=[0, 1])
    unrestricted = evaluate(colour_net, items, class_names=CLASSES, preprocessing=preprocessing,
                            out_dir=tmp_path / "all")

    assert subset["macro_f1"] == pytest.approx(f1_score([0] * 4 + [1] * 4, Y_PRED[:8], average="macro"))
    assert unrestricted["macro_f1"] == pytest.approx(subset["macro_f1"] * 2 / 3)


def test_align_classes_maps_data_indices_to_model_indices_by_name():
    assert align_classes(["b", "c", "a"], ["a", "b", "c"]) == {0: 1, 1: 2, 2: 0}


def test_align_classes_names_the_differences():
    with pytest.raises(FinetuneError) as e:
        align_classes(["a", "b", "zebra"], ["a", "b", "c", "d"])

    message = str(e.value)
    assert "2 checkpoint classes not in the data: 'c', 'd'" in message
    assert "1 data classes not in the checkpoint: 'zebra'" in message
    assert "--allow-subset" in message and "\n" not in message


def test_align_classes_with_allow_subset_keeps_shared_classes_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        mapping = align_classes(["a", "b", "zebra"], ["a", "b", "c"], allow_subset=True)

    assert mapping == {0: 0, 1: 1}
    assert "2 classes shared" in caplog.text and "zebra" in caplog.text


def test_align_classes_refuses_data_without_a_shared_class():
    with pytest.raises(FinetuneError, match="shares no class"):
        align_classes(["x", "y"], ["a", "b"], allow_subset=True)
