"""The scan before training: decode every image once to find the bad ones, and hash it to find duplicates.

Each file is read once; its bytes are hashed (SHA-256) and decoded by the same `decode_image` that
training uses, so a file the scan passes is a file training can read. Files are scanned on a thread
pool: Pillow's decoders and hashlib release the GIL.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple


from finetune._io import atomic_write_text, csv_text
from finetune._workers import usable_cpus
from finetune.data._scan_cache import file_stamp, is_settled, ScanCache
from finetune.data.decode import DEFAULT_MAX_PIXELS, decode_image, ImageDecodeError, read_file
from finetune.data.similarity import perceptual_hash

logger = logging.getLogger(__name__)


class BadFile(NamedTuple):
    """An image file that cannot be used.

    Attributes:
        path: POSIX path relative to the dataset root.
        reason: Why, e.g. ``"empty file (0 bytes)"`` or ``"corrupt image data: image file is truncated"``.
    """

    path: str
    reason: str


class ScanResult(NamedTuple):
    """What the scan learned about one file.

    Attributes:
        path: POSIX path relative to the dataset root.
        reason: Why the file cannot be used, or None for a good file.
        width: Width after EXIF orientation (0 for a bad file).
        height: Height after EXIF orientation (0 for a bad file).
        mode: The file's Pillow mode (``"RGB"``, ``"L"``, ``"CMYK"``...), ``""`` for a bad file.
        sha256: Hex digest of the file's bytes (``""`` for a bad file).
        phash: 64-bit perceptual hash of the decoded image (`perceptual_hash`; 0 for a bad file).
    """

    path: str
    reason: str | None
    width: int = 0
    height: int = 0
    mode: str = ""
    sha256: str = ""
    phash: int = 0


def scan_images(
    root: Path,
    paths: Sequence[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache: str | os.PathLike | None = None,
) -> list[ScanResult]:
    """Read, hash and decode every image, reusing what the scan cache knows about unchanged files.

    Args:
        root: Folder the paths are relative to.
        paths: POSIX paths relative to ``root``.
        max_pixels: Largest width × height accepted.
        cache: The scan cache database (`default_scan_cache` is the shared one; see `finetune.data._scan_cache`
            for when a row is reused), or None to decode every file.

    Returns:
        One result per path, in the order given.
    """
    start = time.monotonic()
    root = Path(root)
    store = ScanCache(cache, root, max_pixels) if cache is not None else None
    known = store.load() if store is not None else {}
    now = time.time_ns()
    results: list[ScanResult | None] = [None] * len(paths)
    stamps: dict[int, str] = {}
    base = os.fspath(root)
    for i, rel in enumerate(paths):  # the stat and look-up of every file: cheap, so in this thread
        try:
            st = os.stat(os.path.join(base, rel))
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        stamp = file_stamp(st)
        row = known.get(rel)
        if row is not None and row[0] == stamp:
            results[i] = ScanResult(rel, *row[1:])
        elif is_settled(st, now):
            stamps[i] = stamp
    todo = [i for i, r in enumerate(results) if r is None]
    logger.info("scanning %d images under %s (%d known to the scan cache)", len(todo), root, len(paths) - len(todo))

    def scan(i: int) -> ScanResult:
        results[i] = _scan_one(root, paths[i], max_pixels)
        return results[i]

    if todo:
        with ThreadPoolExecutor(max_workers=min(usable_cpus(), len(todo))) as pool:
            list(pool.map(scan, todo))
    if store is not None:
        # record a file only if it did not change while it was read (its stamp is still the one from before)
        store.store([(paths[i], stamps[i], *results[i][1:])
                     for i in todo if i in stamps and _stamp_of(root / paths[i]) == stamps[i]])
        store.close()
    bad = sum(r.reason is not None for r in results)
    logger.info("scanned %d images in %.1fs (%d decoded): %d bad", len(results), time.monotonic() - start, len(todo), bad)
    return results


def _stamp_of(path: Path) -> str | None:
    try:
        return file_stamp(os.stat(path))
    except OSError:
        return None


def _scan_one(root: Path, rel: str, max_pixels: int) -> ScanResult:
    try:
        data = read_file(root / rel)
        image, mode = decode_image(data, rel, max_pixels)
    except ImageDecodeError as e:
        return ScanResult(rel, e.reason)
    return ScanResult(rel, None, image.shape[1], image.shape[0], mode, hashlib.sha256(data).hexdigest(),
                      perceptual_hash(image))


def bad_files(results: Sequence[ScanResult]) -> list[BadFile]:
    """The bad files among scan results, sorted by path."""
    return sorted(BadFile(r.path, r.reason) for r in results if r.reason is not None)


def duplicate_groups(results: Sequence[ScanResult]) -> list[list[str]]:
    """Groups of good files with byte-identical content, each sorted, groups sorted by first path."""
    by_digest: dict[str, list[str]] = {}
    for r in results:
        if r.reason is None:
            by_digest.setdefault(r.sha256, []).append(r.path)
    return sorted(sorted(paths) for paths in by_digest.values() if len(paths) > 1)


def write_report(path: str | os.PathLike, bad: Sequence[BadFile]) -> Path:
    """Write the bad files as CSV ``path,reason`` (header included, even when empty), atomically."""
    return atomic_write_text(path, csv_text(BadFile._fields, bad))
