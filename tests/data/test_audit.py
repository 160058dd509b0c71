"""`finetune data audit` and the quick leakage check of `prepare_manifest` (what `finetune train` runs)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import prepare_manifest, write_digits

from tests.conftest import write_tiny_folder

AUDIT_HINT = "finetune data audit"


def _pre_split(root: Path, per_class: int = 8) -> Path:
    """A pre-split tiny folder: train/, val/ and test/ hold different images of the same 3 classes."""
    write_tiny_folder(root / "train", per_class=per_class, seed=0)
    write_tiny_folder(root / "val", per_class=4, seed=1)
    write_tiny_folder(root / "test", per_class=4, seed=2)
    return root


def _leak_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and AUDIT_HINT in r.getMessage()]


def test_quick_leak_check_warns_about_a_resized_copy_across_splits(tmp_path, caplog):
    root = _pre_split(tmp_path / "ds")
    source = root / "train" / "circle" / "003.png"
    Image.open(source).resize((48, 48), Image.Resampling.BICUBIC).save(root / "test" / "circle" / "copy.png")
    with caplog.at_level(logging.WARNING):
        prepare_manifest(root)
    (message,) = _leak_warnings(caplog)
    assert "train/circle/003.png" in message and "test/circle/copy.png" in message
    assert "\n" not in message


def test_quick_leak_check_warns_about_a_jpeg_reencoded_copy(tmp_path, caplog):
    root = _pre_split(tmp_path / "ds")
    Image.open(root / "train" / "square" / "001.png").save(root / "test" / "square" / "copy.jpg", quality=80)
    with caplog.at_level(logging.WARNING):
        prepare_manifest(root)
    assert len(_leak_warnings(caplog)) == 1


def test_quick_leak_check_is_silent_without_copies(tmp_path, caplog):
    """Same-class images share a pattern (and often a perceptual hash) but are not copies: no warning,
    on the tiny folder and on the digits (many look-alike 8×8 scans)."""
    root = _pre_split(tmp_path / "ds")
    digits = write_digits(tmp_path / "digits", size=32)
    with caplog.at_level(logging.WARNING):
        prepare_manifest(root)
        prepare_manifest(digits)
    assert _leak_warnings(caplog) == []


def test_quick_leak_check_ignores_copies_within_one_split(tmp_path, caplog):
    root = _pre_split(tmp_path / "ds")
    src = root / "train" / "circle" / "003.png"
    Image.open(src).resize((48, 48)).save(root / "train" / "circle" / "copy.png")
    with caplog.at_level(logging.WARNING):
        prepare_manifest(root)
    assert _leak_warnings(caplog) == []


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
    from finetune.data.audit import audit_dataset

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
