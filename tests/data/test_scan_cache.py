"""The scan cache: an unchanged file's scan is reused across runs and `finetune data` commands; a file that
changed in any way (content with the same size and mtime, replaced by a bad file, deleted, added) is scanned
again."""
import os
import sqlite3

import numpy as np
import pytest
from PIL import Image

import finetune.data._scan_cache as scan_cache
import finetune.data.scan as images
from finetune.data import default_scan_cache, inspect_dataset, prepare_manifest, scan_images

PAST = 1_600_000_000  # a file settled long ago: its stamp can be trusted


@pytest.fixture
def decodes(monkeypatch):
    """The paths `scan_images` decodes (not served from the cache)."""
    seen = []
    real = images._scan_one

    def spy(root, rel, max_pixels):
        seen.append(rel)
        return real(root, rel, max_pixels)

    monkeypatch.setattr(images, "_scan_one", spy)
    return seen


def settle(folder):
    for p in folder.rglob("*.png"):
        os.utime(p, (PAST, PAST))
    # utime sets the status-change time to now: let the racy window be 0 for these tests
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


@pytest.fixture
def settled(tiny_folder, monkeypatch):
    monkeypatch.setattr(scan_cache, "RACY_SECONDS", 0.0)
    return tiny_folder, settle(tiny_folder)


def test_second_scan_decodes_nothing_and_returns_the_same_results(settled, tmp_path, decodes):
    root, paths = settled
    db = tmp_path / "scan.sqlite3"
    first = scan_images(root, paths, cache=db)
    assert sorted(decodes) == paths
    decodes.clear()
    second = scan_images(root, paths, cache=db)
    assert decodes == []
    assert second == first
    assert all(r.sha256 and r.phash for r in second)


def test_every_change_is_seen_on_the_next_scan(settled, tmp_path, decodes):
    root, paths = settled
    db = tmp_path / "scan.sqlite3"
    before = {r.path: r for r in scan_images(root, paths, cache=db)}
    same_size, to_bad, to_delete = root / paths[0], root / paths[1], root / paths[2]

    # other pixels, mtime restored
    image = np.array(Image.open(same_size))
    Image.fromarray(255 - image).save(same_size)
    os.utime(same_size, (PAST, PAST))
    # a good file replaced by a truncated one
    bad_bytes = to_bad.read_bytes()[:40]
    tmp = to_bad.with_suffix(".tmp")
    tmp.write_bytes(bad_bytes)
    os.replace(tmp, to_bad)
    os.utime(to_bad, (PAST, PAST))
    to_delete.unlink()

    decodes.clear()
    after = {r.path: r for r in scan_images(root, paths, cache=db)}
    assert sorted(decodes) == sorted(paths[:3])
    assert after[paths[0]].reason is None and after[paths[0]].sha256 != before[paths[0]].sha256
    assert after[paths[0]].phash != before[paths[0]].phash
    assert before[paths[1]].reason is None and after[paths[1]].reason == "not an image (unrecognised format)"
    assert after[paths[2]].reason.startswith("cannot read file")
    assert {p: after[p] for p in paths[3:]} == {p: before[p] for p in paths[3:]}


def test_same_size_rewrite_with_old_mtime_is_rescanned(settled, tmp_path, decodes):
    """Bytes changed in place, size kept, mtime put back (``cp -p``, ``touch -d``): the ctime gives it away."""
    root, paths = settled
    db = tmp_path / "scan.sqlite3"
    target = root / paths[0]
    before = scan_images(root, [paths[0]], cache=db)[0]
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # inside the PNG's last chunks: same size, other bytes
    st = target.stat()
    with open(target, "r+b") as f:
        f.write(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    decodes.clear()
    after = scan_images(root, [paths[0]], cache=db)[0]
    assert decodes == [paths[0]]
    assert after != before


def test_recently_changed_files_are_not_recorded(tiny_folder, tmp_path, decodes):
    """A file changed within the racy window may change again within the same clock tick: never recorded."""
    paths = sorted(p.relative_to(tiny_folder).as_posix() for p in tiny_folder.rglob("*.png"))
    db = tmp_path / "scan.sqlite3"
    scan_images(tiny_folder, paths, cache=db)
    decodes.clear()
    scan_images(tiny_folder, paths, cache=db)
    assert sorted(decodes) == paths


def test_other_max_pixels_is_another_scan(settled, tmp_path, decodes):
    root, paths = settled
    db = tmp_path / "scan.sqlite3"
    scan_images(root, paths, cache=db)
    decodes.clear()
    small = scan_images(root, paths, cache=db, max_pixels=100)
    assert sorted(decodes) == paths
    assert all(r.reason.startswith("too many pixels") for r in small)


def test_prepare_and_inspect_share_the_default_cache(settled, decodes):
    root, paths = settled
    manifest, _ = prepare_manifest(root, seed=1)
    assert default_scan_cache().is_file()
    decodes.clear()
    report = inspect_dataset(root)
    again, _ = prepare_manifest(root, seed=1)
    assert decodes == []
    assert again.rows == manifest.rows and report["num_images"] == len(paths)
    with sqlite3.connect(default_scan_cache()) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM scans").fetchone()[0] >= len(paths)


def test_unusable_database_scans_without_it(settled, tmp_path, caplog, decodes):
    root, paths = settled
    db = tmp_path / "not-a-db.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    results = scan_images(root, paths, cache=db)
    assert sorted(decodes) == paths and all(r.reason is None for r in results)
    assert "cannot be used" in caplog.text
