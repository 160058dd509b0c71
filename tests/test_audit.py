"""`finetune data audit` (`finetune.audit`): planted problems on the digits, layouts, files, HTML, JSON."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data import prepare_manifest, write_digits

from tests.browser import assert_page_works, render
from tests.conftest import write_tiny_folder


def _pre_split(root: Path, per_class: int = 8) -> Path:
    """A pre-split tiny folder: train/, val/ and test/ hold different images of the same 3 classes."""
    write_tiny_folder(root / "train", per_class=per_class, seed=0)
    write_tiny_folder(root / "val", per_class=4, seed=1)
    write_tiny_folder(root / "test", per_class=4, seed=2)
    return root


# ---------------------------------------------------------------------------------- planted problems

def _plant(tmp_path: Path) -> tuple[Path, dict]:
    """A manifest over a copy of the digits (split as training splits it) with planted problems:
    5 % of the training labels flipped, 20 training images copied into val/test after a resize, a JPEG
    re-encode or a 2-pixel crop, and 10 noise images planted as training outliers."""
    from finetune.data import Manifest, ManifestRow

    root = write_digits(tmp_path / "digits", size=32)
    manifest, _ = prepare_manifest(root)
    rng = np.random.default_rng(0)
    rows = list(manifest.rows)
    train = [i for i, r in enumerate(rows) if r.split == "train"]
    order = rng.permutation(train)
    flips, sources = order[: round(0.05 * len(train))], order[len(train) // 2: len(train) // 2 + 20]
    for i in flips:
        r = rows[i]
        rows[i] = r._replace(label=str((int(r.label) + rng.integers(1, 10)) % 10))
    (root / "planted").mkdir()
    copies = {}
    for k, i in enumerate(sources):
        image = Image.open(root / rows[i].path).convert("RGB")
        if k % 3 == 0:
            name, image = f"planted/resized{k}.png", image.resize((45, 45), Image.Resampling.BICUBIC)
        elif k % 3 == 1:
            name = f"planted/reencoded{k}.jpg"
        else:
            name, image = f"planted/cropped{k}.png", image.crop((2, 2, 30, 30))
        image.save(root / name, quality=75) if name.endswith(".jpg") else image.save(root / name)
        rows.append(ManifestRow(name, rows[i].label, ("val", "test")[k % 2]))
        copies[name] = rows[i].path
    outliers = []
    for k in range(10):
        name = f"planted/noise{k}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name)
        rows.append(ManifestRow(name, str(k), "train"))
        outliers.append(name)
    path = Manifest(root, rows).write_csv(root / "planted.csv")
    return path, {"flipped": {rows[i].path for i in flips}, "copies": copies, "outliers": set(outliers)}


def test_audit_finds_planted_problems_in_digits(tmp_path):
    from finetune.audit import audit_dataset

    manifest, planted = _plant(tmp_path)
    audit = audit_dataset(manifest, input_size=64, device="cpu", cache_dir=tmp_path / "cache", batch_size=128)

    k = len(planted["flipped"])
    top = [r["path"] for r in audit.label_issues[:k]]
    assert len(set(top) & planted["flipped"]) / k >= 0.8

    grouped = {p: g for g in audit.near_duplicates for p in g["paths"]}
    found = [c for c, s in planted["copies"].items() if c in grouped and s in grouped[c]["paths"]]
    assert len(found) / len(planted["copies"]) >= 0.95
    planted_pairs = {p for pair in planted["copies"].items() for p in pair}
    for group in audit.near_duplicates:
        if group["leak"]:  # no false leak among untouched images
            assert set(group["paths"]) <= planted_pairs and set(group["paths"]) & set(planted["copies"])
    assert all(g["leak"] for g in audit.near_duplicates if set(g["paths"]) & set(planted["copies"]))

    assert planted["outliers"] <= {o["path"] for o in audit.outliers[:20]}
    assert all(o["flagged"] for o in audit.outliers if o["path"] in planted["outliers"])


def test_near_duplicates_find_a_crop_whose_embedding_drifted(tmp_path):
    """Candidates also come from the nearest thumbnails: a 2-pixel crop whose embedding is nowhere near its
    source's (here: unrelated random features) is still found, and no two different digits are grouped."""
    from finetune.audit import find_near_duplicates

    root = write_digits(tmp_path / "digits", size=32)
    paths = sorted(root.rglob("*.png"))[:300]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images.append(np.asarray(Image.fromarray(images[7]).crop((2, 2, 30, 30))))
    features = np.random.default_rng(0).normal(size=(len(images), 64))  # cosine ~0 between any two

    groups = find_near_duplicates(features, lambda i: images[i])
    assert [members for members, _ in groups] == [[7, len(images) - 1]]


def test_label_issues_are_ranked_by_a_score_that_does_not_saturate(tmp_path):
    """Well-separated classes make the out-of-fold probabilities exactly 0 or 1: the flipped images must
    still get distinct scores (ranked by the given label's log-probability, not tied at 1 - p = 1)."""
    from finetune.audit import audit_features
    from finetune.data import Manifest, ManifestRow

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    features = rng.normal(size=(180, 32)) + 40.0 * np.eye(3, 32)[labels]
    given = labels.copy()
    flipped = rng.choice(180, 8, replace=False)
    given[flipped] = (labels[flipped] + 1) % 3
    manifest = Manifest(tmp_path, [ManifestRow(f"{i:03d}.png", str(c), "train") for i, c in enumerate(given)])
    order = [int(r.path[:3]) for r in manifest.rows]  # the manifest sorts its rows by class
    noise = rng.integers(0, 256, (180, 16, 16, 3), dtype=np.uint8)

    audit = audit_features(manifest, features[order], load=lambda i: noise[i])
    top = audit.label_issues[: len(flipped)]
    assert {r["path"] for r in top} == {f"{i:03d}.png" for i in flipped}
    assert sum(r["p_given"] == 0.0 for r in top) >= 2  # the probabilities saturate...
    scores = [r["score"] for r in top]
    assert all(a > b for a, b in zip(scores, scores[1:]))  # ...the scores do not


# ------------------------------------------------------------------------------------------------ CLI

TINY = ("--backbone", "test_resnet", "--pretrained", "none", "--input-size", "32", "--device", "cpu")


def _audit(capsys, tmp_path, source, *extra):
    from finetune.cli import main

    out = tmp_path / "audit"
    status = main(["data", "audit", str(source), *TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra])
    stdout, stderr = capsys.readouterr()
    return status, stdout, stderr, out


def test_cli_audits_a_pre_split_folder_with_json_and_a_self_contained_escaped_report(tmp_path, capsys):
    root = _pre_split(tmp_path / "ds")
    shutil.move(root / "train" / "stripes", root / "train" / "<script>")
    shutil.move(root / "val" / "stripes", root / "val" / "<script>")
    shutil.move(root / "test" / "stripes", root / "test" / "<script>")
    Image.open(root / "train" / "circle" / "003.png").resize((48, 48)).save(root / "test" / "circle" / "copy.png")
    status, stdout, _, out = _audit(capsys, tmp_path, root, "--json")
    assert status == 0
    report = json.loads(stdout)
    assert report["summary"]["images"] == 8 * 3 + 4 * 3 + 4 * 3 + 1
    assert report["summary"]["leaking_groups"] == 1 and report["summary"]["leaked_images"] == 1
    (group,) = [g for g in report["near_duplicates"] if g["leak"]]
    assert sorted(group["paths"]) == ["test/circle/copy.png", "train/circle/003.png"]
    assert set(report["files"]) == {"near_duplicates.csv", "blank_images.csv", "label_issues.csv", "outliers.csv", "audit.html"}
    rows = list(csv.DictReader(open(out / "near_duplicates.csv", encoding="utf-8")))
    assert {(r["path"], r["leak"]) for r in rows} >= {("test/circle/copy.png", "1"), ("train/circle/003.png", "1")}
    assert (out / "label_issues.csv").read_text().startswith("rank,path,split,given,suggested,score")
    assert (out / "outliers.csv").read_text().startswith("rank,path,split,class,distance")
    page = (out / "audit.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;" in page and page.count("<script") == 1  # the page's own script only
    assert "data:image/jpeg;base64," in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_audit_page_works_in_headless_chromium(tmp_path, capsys):
    root = _pre_split(tmp_path / "ds", per_class=4)
    for split in ("train", "val", "test"):
        shutil.move(root / split / "stripes", root / split / "<script>")
    Image.open(root / "train" / "circle" / "003.png").resize((48, 48)).save(root / "test" / "circle" / "copy.png")
    status, _, _, out = _audit(capsys, tmp_path, root)
    assert status == 0

    checks, screenshot, log = render(out / "audit.html", tmp_path)

    assert len(checks["images"]) >= 2  # at least the leaking pair's thumbnails
    assert_page_works(checks, screenshot, log, tables=1, literal="<script>")


def test_cli_audits_a_one_folder_dataset_split_as_training_splits_it(tmp_path, capsys, tiny_folder):
    status, stdout, _, out = _audit(capsys, tmp_path, tiny_folder)
    assert status == 0
    assert stdout.startswith("Audited 36 images of 3 classes (train 24, val 6, test 6)") and str(out) in stdout
    assert "\n" not in stdout.strip()
    assert all((out / name).is_file() for name in ("near_duplicates.csv", "label_issues.csv", "outliers.csv", "audit.html"))


def test_cli_audits_a_manifest(tmp_path, capsys, tiny_folder):
    from finetune.cli import main

    assert main(["data", "split", str(tiny_folder), "--out", str(tiny_folder / "split.csv"), "--test", "0.5"]) == 0
    capsys.readouterr()
    status, stdout, _, out = _audit(capsys, tmp_path, tiny_folder / "split.csv", "--json")
    first = json.loads(stdout)
    assert status == 0 and first["summary"]["splits"] == {"train": 12, "val": 6, "test": 18}
    assert first["features_cached"] is False
    status, stdout, _, out = _audit(capsys, tmp_path, tiny_folder / "split.csv", "--json")
    again = json.loads(stdout)
    assert again["features_cached"] is True and again["outliers"] == first["outliers"]


def test_cli_audits_a_manifest_outside_its_root(tmp_path, capsys, tiny_folder):
    """``--root``: the folder a manifest's paths are relative to, as in a run folder's copy of the manifest."""
    from finetune.data import prepare_manifest

    manifest, _ = prepare_manifest(tiny_folder)
    path = manifest.write_csv(tmp_path / "run" / "manifest.csv")
    status, stdout, _, _ = _audit(capsys, tmp_path, path, "--root", str(tiny_folder), "--json")
    assert status == 0 and json.loads(stdout)["summary"]["images"] == 36
    status, _, stderr, _ = _audit(capsys, tmp_path, tiny_folder, "--root", str(tiny_folder))
    assert status == 2 and "--root" in stderr and stderr.count("\n") == 1


def test_cli_audit_errors_are_one_line(tmp_path, capsys):
    status, _, stderr, _ = _audit(capsys, tmp_path, tmp_path / "missing")
    assert status == 2 and stderr.startswith("finetune data: error:") and stderr.count("\n") == 1


def test_cli_audit_runs_as_a_command(tmp_path, tiny_folder):
    """One real subprocess: the entry point, stdout pure JSON with --json (progress goes to stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "data", "audit", str(tiny_folder), *TINY, "--json",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["classes"] == 3 and (tmp_path / "out" / "audit.html").is_file()


# ------------------------------------------------------------------------------------------- multi-label

def test_multilabel_label_issues_find_planted_missing_and_extra_labels():
    """Per-label confident learning: features that show labels 0-3 (one direction each); a label removed from
    some images comes back as missing, a label added to others as extra, each of the right label."""
    from finetune.audit import multilabel_label_issues

    rng = np.random.default_rng(0)
    truth = (rng.random((240, 4)) < 0.4).astype(int)
    truth[truth.sum(1) == 0, 0] = 1
    features = rng.normal(size=(240, 32)) + 12.0 * truth @ np.eye(4, 32)
    given = truth.copy()
    removed = [(i, int(np.flatnonzero(truth[i])[0])) for i in range(0, 40, 5)]
    added = [(i, int(np.flatnonzero(truth[i] == 0)[0])) for i in range(101, 160, 6) if (truth[i] == 0).any()]
    for i, c in removed:
        given[i, c] = 0
    for i, c in added:
        given[i, c] = 1
    found = {(i, c): kind for i, c, kind, *_ in multilabel_label_issues(features, given)}
    assert sum(found.get(ic) == "missing" for ic in removed) >= 0.8 * len(removed)
    assert sum(found.get(ic) == "extra" for ic in added) >= 0.8 * len(added)
    assert found.get(removed[0]) != "extra" and all(found.get(ic) != "missing" for ic in added)
    clean = [ic for ic in found if ic not in dict.fromkeys(removed + added)]
    assert len(clean) <= 5  # few false alarms on the rows left as they were


def test_cli_audits_a_multilabel_labels_csv_per_label_with_leakage(tmp_path, capsys):
    from tests.training.test_multilabel_training import write_mosaics

    labels = write_mosaics(tmp_path / "ds", n=60)
    rows = list(csv.DictReader(open(labels)))
    shutil.copy(tmp_path / "ds" / rows[0]["path"], tmp_path / "ds" / "copy.png")
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows([(r["path"], r["labels"], "train" if i < 40 else "val" if i < 50 else "test")
                          for i, r in enumerate(rows)])
        writer.writerow(["copy.png", rows[0]["labels"], "test"])
    status, stdout, _, out = _audit(capsys, tmp_path, labels, "--json")
    assert status == 0
    report = json.loads(stdout)
    assert report["settings"]["task"] == "multilabel" and report["summary"]["classes"] == 4
    assert report["summary"]["images"] == 61 and report["outliers"] == []
    leaks = [g for g in report["near_duplicates"] if g["leak"]]
    assert any(sorted(g["paths"]) == ["000.png", "copy.png"] for g in leaks)
    assert all(r["kind"] in ("missing", "extra") and r["label"] in {"d0", "d1", "d2", "d3"} for r in report["label_issues"])
    header = (out / "label_issues.csv").read_text().splitlines()[0]
    assert header == "rank,path,split,given,suggested,score,p_given,p_suggested,label,kind"
    page = (out / "audit.html").read_text(encoding="utf-8")
    assert "<h2>Per label</h2>" in page and "d3" in page
    status, stdout, _, _ = _audit(capsys, tmp_path, labels)
    assert status == 0 and "multi-label images of 4 labels" in stdout and "Outliers: not computed" in stdout
