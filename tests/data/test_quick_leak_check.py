"""The quick leakage check of `prepare_manifest` (what `finetune train` runs): same perceptual hash in
different splits, confirmed by thumbnails; no backbone."""
from __future__ import annotations

import logging
from pathlib import Path

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


def test_quick_leak_check_names_the_manifest_training_used(tmp_path, caplog):
    """Training from a manifest: the warning's command audits that manifest (its split), not the folder,
    with ``--root`` where the manifest lies outside the folder its paths are relative to (a run's copy)."""
    root = _pre_split(tmp_path / "ds")
    Image.open(root / "train" / "circle" / "003.png").resize((48, 48)).save(root / "test" / "circle" / "copy.png")
    manifest, _ = prepare_manifest(root)
    inside, outside = manifest.write_csv(root / "split.csv"), manifest.write_csv(tmp_path / "run" / "manifest.csv")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_manifest(inside)
        prepare_manifest(root, manifest=outside)
    messages = _leak_warnings(caplog)
    assert len(messages) == 2
    assert f"`finetune data audit {inside}`" in messages[0]
    assert f"`finetune data audit {outside} --root {root}`" in messages[1]


def test_a_second_check_of_an_unchanged_folder_decodes_no_thumbnail(tmp_path, caplog, monkeypatch):
    """The first check decodes the thumbnails of the pairs whose hash collides across splits and keeps its verdicts
    in the scan cache; the second decodes none and warns exactly as the first did."""
    from finetune.data import prepare as prepare_module

    root = _pre_split(tmp_path / "ds")
    Image.open(root / "train" / "circle" / "003.png").resize((48, 48)).save(root / "test" / "circle" / "copy.png")
    loads = []
    real = prepare_module.load_image
    monkeypatch.setattr(prepare_module, "load_image", lambda path, *a: loads.append(path) or real(path, *a))
    cache = tmp_path / "scan.sqlite3"
    with caplog.at_level(logging.WARNING):
        prepare_manifest(root, scan_cache=cache)
    first, warned = len(loads), _leak_warnings(caplog)
    assert first >= 2 and len(warned) == 1
    loads.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_manifest(root, scan_cache=cache)
    assert loads == [] and _leak_warnings(caplog) == warned
    prepare_manifest(root, scan_cache=False)  # without the cache it decodes again: the verdicts save the work
    assert len(loads) == first


def test_pair_verdicts_spare_every_decode_on_look_alikes_and_give_the_same_groups(tmp_path):
    """Look-alikes: 30 different images that all share one perceptual hash, across two splits, plus one copy. The
    first check judges all 15 x 16 cross-split pairs from thumbnails; the second, from the cache, loads nothing."""
    import numpy as np

    from finetune.data._scan_cache import PairVerdicts
    from finetune.data.similarity import hash_leaks, verdict_settings

    rng = np.random.default_rng(0)
    images = {f"{i}": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for i in range(30)}
    images["copy"] = images["3"].copy()
    paths = list(images)
    splits = ["train" if i % 2 else "val" for i in range(30)] + ["val"]
    digests = [f"sha-{p}" if p != "copy" else "sha-3" for p in paths]
    loads = []

    def load(path):
        loads.append(path)
        return images[path]

    def check():
        verdicts = PairVerdicts(tmp_path / "scan.sqlite3", verdict_settings())
        try:
            return hash_leaks(paths, splits, [7] * len(paths), load, digests=digests, verdicts=verdicts)
        finally:
            verdicts.close()

    first = check()
    assert first == [["3", "copy"]] and len(set(loads)) == 31
    loads.clear()
    assert check() == first and loads == []
    other = PairVerdicts(tmp_path / "scan.sqlite3", verdict_settings(threshold=0.5))  # other settings: not reused
    assert other.load([("sha-0", "sha-1")]) == {}
    other.close()
