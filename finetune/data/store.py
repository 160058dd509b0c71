"""The resize cache, `resize_cache`: decode and shrink every image once, so that training epochs read small copies.

Datasets of large photos pay a full-size JPEG decode for every image in every epoch (a 12-megapixel
JPEG takes about 100 ms to decode), only for the pipeline's first op to throw most of the pixels away.
The cache does that decode and resize once; later epochs and runs decode a copy that is a fraction of the
size.

Its layout: ``cache_dir/<size>px-q<quality>-v<format version>/<hash>.jpg`` (or ``.png``). The hash is
SHA-256 of the source's absolute path, file size and modification time (ns), the size, the JPEG quality,
the decode pixel limit and the format version: a changed source file gets a new entry, and a copy made
for other settings is never reused. Nothing is evicted; delete a folder to reclaim its space.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from finetune._io import atomic_write_bytes
from finetune.data.decode import _decode, DEFAULT_MAX_PIXELS, ImageDecodeError, read_file
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 2  # 2: large JPEGs decoded at a DCT-reduced scale before the INTER_AREA shrink
"""Bump when the way copies are made changes (filter, file format, key), so old copies are not reused."""

_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})


class _Entry(NamedTuple):
    path: Path  # the cached copy, or the source when it could not be read
    made: bool
    error: str | None = None


def resize_cache(
    items: Sequence[tuple[str | os.PathLike, int]],
    *,
    size: int,
    cache_dir: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0,
    quality: int = 95,
) -> list[tuple[Path, int]]:
    """Copy every image with its shorter side shrunk to ``size`` pixels, and return the copies' items.

    Each image is decoded by `load_image`, so its RGB conversion, EXIF orientation and alpha compositing
    are applied once, here; a JPEG at least twice ``size`` is decoded at a DCT-reduced scale that keeps
    ``size`` (``min_side``), several times faster than a full decode. An image whose shorter side is longer than ``size`` is shrunk to it, keeping
    the aspect ratio (the longer side is rounded to the nearest pixel), with OpenCV's ``INTER_AREA``; one
    at or below ``size`` is never upscaled, only stored as its decoded RGB.

    Copies of JPEG sources (``.jpg``/``.jpeg``) are JPEG at ``quality`` without chroma subsampling (4:4:4):
    the source is lossy already and one more high-quality generation is not measurable. Copies of every
    other source (PNG, BMP, TIFF, GIF, WebP) are PNG, so line art, screenshots and greyscale scans stay
    free of JPEG artefacts. Both decode through `load_image` as H×W×3 RGB.

    Existing copies are reused without reading the source (only its size and modification time). Files
    are written through a temporary file and ``os.replace``, so several processes (DDP ranks) may fill the
    same cache at once. Only images that are decoded during training benefit; pick ``size`` as the
    shorter side the pipeline's first resize needs (e.g. 230 for ``Resize(230, 230)``, or 256 for a 224
    centre crop at crop_pct 0.875). With ``RandomResizedCrop``, small crops are upscaled from the copy,
    so cache larger than the crop (e.g. 1.5×) to keep their detail.

    Args:
        items: (absolute image path, class index) pairs, e.g. `Manifest.items`.
        size: Shorter side of the copies, in pixels.
        cache_dir: Folder of the cache (see the module docstring for the layout); created if missing.
        max_pixels: Largest width × height decoded, as in `load_image`.
        workers: Threads that decode and resize in parallel (OpenCV and Pillow release the GIL);
            0 works in the calling thread.
        quality: JPEG quality of the copies of JPEG sources (1-100).

    Returns:
        (cached copy, class index) for every item, in the order given: ready for `ImageDataset`. An image
        that cannot be read keeps its original path (`ImageDataset` skips and counts it during training);
        one warning gives how many there are.

    Raises:
        FinetuneError: ``size`` is below 1 or ``quality`` outside 1-100; the cache cannot be written.
    """
    if size < 1:
        raise FinetuneError(f"resize cache size must be at least 1 pixel, got {size}")
    if not 1 <= quality <= 100:
        raise FinetuneError(f"resize cache JPEG quality must be 1-100, got {quality}")
    start = time.monotonic()
    items = list(items)
    folder = Path(cache_dir) / f"{size}px-q{quality}-v{_FORMAT_VERSION}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"cannot create the resize cache {folder}: {e}") from e
    settings = f"{_FORMAT_VERSION}\0{size}\0{quality}\0{max_pixels}".encode()

    def cache(item: tuple[str | os.PathLike, int]) -> _Entry:
        return _cache_one(Path(item[0]), folder, settings, size=size, quality=quality, max_pixels=max_pixels)

    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            entries = list(pool.map(cache, items))
    else:
        entries = [cache(item) for item in items]

    unreadable = [e.error for e in entries if e.error is not None]
    if unreadable:
        logger.warning(
            "resize cache: %d of %d images could not be read and keep their original path (first: %s)",
            len(unreadable), len(entries), unreadable[0],
        )
    made = sum(e.made for e in entries)
    logger.info(
        "resize cache %s: %d images, %d made, %d reused, %d unreadable in %.1fs",
        folder, len(entries), made, len(entries) - made - len(unreadable), len(unreadable), time.monotonic() - start,
    )
    return [(entry.path, int(label)) for entry, (_, label) in zip(entries, items)]


def _cache_one(source: Path, folder: Path, settings: bytes, *, size: int, quality: int, max_pixels: int) -> _Entry:
    try:
        stat = source.stat()
    except OSError as e:
        return _Entry(source, False, f"{source}: cannot read file: {e.strerror or e}")
    key = hashlib.sha256(b"\0".join([settings, os.fsencode(os.path.abspath(source)),
                                     f"{stat.st_size}\0{stat.st_mtime_ns}".encode()]))
    jpeg = source.suffix.lower() in _JPEG_SUFFIXES
    target = folder / f"{key.hexdigest()[:32]}{'.jpg' if jpeg else '.png'}"
    if target.exists():
        return _Entry(target, False)
    try:
        image, _, full = _decode(read_file(source), source, max_pixels, size)
    except ImageDecodeError as e:
        return _Entry(source, False, str(e))
    _save_copy(target, _shrink(image, size, full), quality if jpeg else None)
    return _Entry(target, True)


def _shrink(image: np.ndarray, size: int, full: tuple[int, int] | None = None) -> np.ndarray:
    """``image`` with its shorter side brought down to ``size`` (INTER_AREA); unchanged if not longer. The
    output size is computed from ``full`` (height, width) when the image was decoded at a reduced scale,
    so it does not depend on the reduction."""
    height, width = full or image.shape[:2]
    short = min(height, width)
    if short <= size:
        return image
    # INTER_AREA averages the source pixels under each output pixel (antialiased). Shrinking a 4000×3000
    # photo took it 23 ms, against 54 ms for Pillow's LANCZOS with reducing_gap=3 and 106 ms for LANCZOS.
    if width == short:
        new_size = (size, round(height * size / width))
    else:
        new_size = (round(width * size / height), size)
    return cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)


def _save_copy(path: Path, image: np.ndarray, jpeg_quality: int | None) -> None:
    """Save RGB ``image`` as JPEG (given a quality) or PNG, atomically and synced: a copy truncated by a
    crash would look valid to the next run."""
    buf = io.BytesIO()
    if jpeg_quality is None:
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise FinetuneError(f"cannot write the resize cache file {path}: {e}") from e
