import copy
import csv
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from finetune.evaluation import evaluate
from finetune.evaluation.report import SECTIONS

from tests.browser import assert_page_works, render
from tests.evaluation.conftest import PREPROCESSING, ColourNet, write_images

EVIL = "<img src=x onerror=alert(1)>"
CLASSES = [EVIL, "dog", "fox"]  # ColourNet: red → class 0, green → dog, blue → fox
RED, GREEN, BLUE = (220, 40, 40), (40, 200, 40), (40, 40, 220)
METRIC_COLUMNS = ["stage", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
                  "images_per_s", "seconds"]


def write_run(run_dir: Path) -> Path:
    """The parts of a training run folder the report reads: metrics.csv and training_curves.png."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRIC_COLUMNS)
        for epoch in range(1, 4):
            writer.writerow(["head", epoch, 1e-3, 1.0 / epoch, 0.5 + epoch / 10, 1.1 / epoch, 0.4 + epoch / 10,
                             0.3 + epoch / 10, 900.0, 2.5])
    fig = Figure(figsize=(6, 3))
    fig.add_subplot().plot([1, 2, 3], [1.0, 0.5, 0.33], label="train_loss")
    fig.savefig(run_dir / "training_curves.png")
    return run_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """report.html of an evaluation with a class folder named like an XSS payload, from a run (made once: the
    tests only read it)."""
    tmp_path = tmp_path_factory.mktemp("report")
    colour_net, preprocessing = ColourNet(), copy.deepcopy(PREPROCESSING)
    root = write_images(tmp_path / "images", {EVIL: [RED] * 3, "dog": [GREEN, GREEN, RED], "fox": [BLUE, GREEN, BLUE]})
    items = [(p, i) for i, name in enumerate(CLASSES) for p in sorted((root / name).iterdir())]
    (root / "fox" / "corrupt.png").write_bytes(b"\x89PNG broken")
    items.append((root / "fox" / "corrupt.png", 2))
    out = tmp_path / "eval"
    evaluate(colour_net, items, class_names=CLASSES, preprocessing=preprocessing, out_dir=out,
             run_dir=write_run(tmp_path / "run"), details={"checkpoint": "runs/x/checkpoints/best"})
    return out / "report.html"


def test_report_contains_every_section(report):
    text = report.read_text()

    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    assert text.count('<img class="zoom" alt="Counts') == 1 and text.count('alt="Row-normalised') == 1
    assert text.count("<tr><td data-v=") == 3  # a per-class row for each class
    # worst mistakes: dog/02.png → class 0, fox/01.png → dog; then the most confident correct one per class
    assert text.count("<figure") == 2 + 3
    assert "No heat-maps: the model (ColourNet) is not a timm backbone plus a head." in text
    assert 'alt="training curves"' in text and "metrics.csv (3 rows)" in text
    assert "Accuracy" in text and "Macro F1" in text and "Calibration error" in text
    assert "corrupt.png" in text and "runs/x/checkpoints/best" in text


def test_report_escapes_class_names_and_paths(report):
    text = report.read_text()

    assert EVIL not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text


def test_report_is_self_contained(report):
    text = report.read_text()

    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', text)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert "http://" not in text and "https://" not in text


def test_report_without_a_run_says_there_are_no_training_curves(tmp_path, write_images, colour_net, preprocessing):
    root = write_images(tmp_path / "images", {"cat": [RED], "dog": [GREEN]})
    items = [(root / "cat" / "00.png", 0), (root / "dog" / "00.png", 1)]

    evaluate(colour_net, items, class_names=["cat", "dog", "fox"], preprocessing=preprocessing,
             out_dir=tmp_path / "eval")

    text = (tmp_path / "eval" / "report.html").read_text()
    assert "does not come from a run folder" in text and 'alt="training curves"' not in text
    assert "No misclassification." in text


def test_report_works_in_headless_chromium(report, tmp_path):
    checks, screenshot, log = render(report, tmp_path)

    # images: 2 confusion plots, the reliability diagram, the training curves, 2 misclassified and 3 correct thumbnails
    assert len(checks["images"]) == 2 + 1 + 1 + 2 + 3
    assert_page_works(checks, screenshot, log, tables=1, literal=EVIL)
