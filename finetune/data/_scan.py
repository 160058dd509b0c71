"""The pre-training scan: decode every image once to find the bad ones, and hash it to find duplicates.

Each file is read once; its bytes are hashed (SHA-256) and decoded by the same `decode_image` that
training uses, so a file the scan passes is a file training can read. Files are scanned on a thread
pool: Pillow's decoders and hashlib release the GIL.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from finetune.data._decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, read_file
from finetune._io import atomic_write_text
from finetune.data._manifest import Manifest
from finetune.data._similarity import perceptual_hash

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


def scan_images(root: Path, paths: Sequence[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ScanResult]:
    """Read, hash and decode every image.

    Args:
        root: Folder the paths are relative to.
        paths: POSIX paths relative to ``root``.
        max_pixels: Largest width × height accepted.

    Returns:
        One result per path, in the order given.
    """
    start = time.monotonic()
    logger.info("scanning %d images under %s", len(paths), root)

    def scan(rel: str) -> ScanResult:
        try:
            data = read_file(root / rel)
            image, mode = decode_image(data, rel, max_pixels)
        except ImageDecodeError as e:
            return ScanResult(rel, e.reason)
        return ScanResult(rel, None, image.shape[1], image.shape[0], mode, hashlib.sha256(data).hexdigest(),
                          perceptual_hash(image))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(scan, paths))
    bad = sum(r.reason is not None for r in results)
    logger.info("scanned %d images in %.1fs: %d bad", len(results), time.monotonic() - start, bad)
    return results


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


def leaks(manifest: Manifest, groups: list[list[str]]) -> list[list[str]]:
    """The duplicate groups whose files sit in more than one split of ``manifest``: leakage."""
    split_of = {r.path: r.split for r in manifest.rows}
    return [g for g in groups if len({split_of[p] for p in g if p in split_of}) > 1]


def write_report(path: str | os.PathLike, bad: Sequence[BadFile]) -> Path:
    """Write the bad files as CSV ``path,reason`` (header included, even when empty), atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(BadFile._fields)
    writer.writerows(bad)
    return atomic_write_text(path, text.getvalue())
