import csv
import json
import shutil

import pytest
from sklearn.metrics import accuracy_score, f1_score

from finetune.cli import main
from finetune.data import Manifest, ManifestRow, prepare_manifest
from finetune.inference.predictor import load

EVAL_FILES = {"metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png",
              "confusion_matrix_normalized.png", "most_confused.csv", "misclassified.csv", "report.html"}
METRIC_KEYS = {"num_samples", "accuracy", "top5_accuracy", "balanced_accuracy", "macro_precision", "macro_recall",
               "macro_f1", "weighted_f1", "ece", "loss"}


def test_eval_writes_every_file_with_metrics_that_agree_with_predict(checkpoint, image_folder, tmp_path):
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt" / "best")

    status = main(["eval", str(folder), "--data", str(image_folder), "--split", "all", "--device", "cpu"])

    out = tmp_path / "ckpt" / "best-eval-all"
    assert status == 0 and EVAL_FILES <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["num_samples"] == 12
    predictor = load(folder)
    paths = sorted(image_folder.rglob("*.png"))
    y_true = [predictor.classes.index(p.parent.name) for p in paths]
    y_pred = [predictor.classes.index(pred.label) for pred in predictor.predict(paths)]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2], zero_division=0))


def test_eval_of_a_folder_uses_the_split_the_recipe_options_give(checkpoint, image_folder, tmp_path):
    test_split = prepare_manifest(image_folder, seed=0, scan=False)[0].items("test")

    assert main(["eval", str(checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "e")]) == 0

    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_samples"] == len(test_split)


def test_eval_of_a_run_checkpoint_uses_the_runs_manifest_and_training_curves(checkpoint, image_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoints" / "best")
    (run / "metrics.csv").write_text("stage,epoch,val_acc\nhead,1,0.5\nhead,2,0.75\n")
    # A split no seeded rule would make: the test split is all cats and one dog.
    rows = [ManifestRow(f"{c}/{i:02d}.png", c, "test" if c == "cat" or (c, i) == ("dog", 0) else "train")
            for c in ("cat", "dog", "fox") for i in range(4)]
    Manifest(run, rows).write_csv(run / "manifest.csv")

    assert main(["eval", str(run), "--data", str(image_folder)]) == 0

    out = run / "eval-test"
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 5
    report = (out / "report.html").read_text()
    assert "metrics.csv (2 rows)" in report


def test_eval_accepts_a_manifest_csv(checkpoint, image_folder, tmp_path):
    rows = [ManifestRow(f"{c}/{i:02d}.png", c, "val" if i < 2 else "train") for c in ("cat", "dog", "fox") for i in range(4)]
    Manifest(image_folder, rows).write_csv(image_folder / "split.csv")

    assert main(["eval", str(checkpoint), "--data", str(image_folder / "split.csv"), "--split", "val",
                 "--out", str(tmp_path / "e")]) == 0

    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_samples"] == 6


def test_eval_refuses_data_whose_classes_differ_and_names_them(checkpoint, image_folder, tmp_path, capsys):
    shutil.move(image_folder / "fox", image_folder / "wolf")

    status = main(["eval", str(checkpoint), "--data", str(image_folder), "--split", "all", "--out", str(tmp_path / "e")])

    err = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "e").exists()
    assert "1 checkpoint classes not in the data: 'fox'" in err and "1 data classes not in the checkpoint: 'wolf'" in err


def test_eval_with_allow_subset_evaluates_the_shared_classes(checkpoint, image_folder, tmp_path, caplog):
    shutil.move(image_folder / "fox", image_folder / "wolf")

    status = main(["eval", str(checkpoint), "--data", str(image_folder), "--split", "all", "--allow-subset",
                   "--out", str(tmp_path / "e")])

    assert status == 0
    assert "evaluating the 2 classes shared with the checkpoint" in caplog.text
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_samples"] == 8
    with open(tmp_path / "e" / "per_class.csv", newline="") as f:
        support = {r["class"]: int(r["support"]) for r in csv.DictReader(f)}
    assert support == {"cat": 4, "dog": 4, "fox": 0}


def test_eval_refuses_a_missing_data_folder(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such data folder or manifest" in capsys.readouterr().err


def test_eval_of_a_folder_with_bad_files_splits_it_as_training_did(image_folder):
    from finetune.data.prepare import split_like_run

    (image_folder / "cat" / "00.png").write_bytes(b"")
    trained, bad = prepare_manifest(image_folder, seed=0)  # what a run with these data options trains on
    assert [b.path for b in bad] == ["cat/00.png"]

    assert split_like_run(str(image_folder), {"seed": 0}).rows == trained.rows
