"""Image files: decoding, the pre-training scan, pixel similarity and the resize cache.

**Decoding**: every file becomes an H×W×3 uint8 RGB array, or an `ImageDecodeError` with a reason.

All decoding in finetune goes through `load_image` (training, evaluation, the pre-training scan), so
the scan finds exactly the files that training could not read.

Conversions, by Pillow mode:

* ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGB``: Pillow's ``convert("RGB")``;
  greyscale is replicated into the three channels.
* Anything with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) and anything with a transparency key
  (palette or greyscale PNG/GIF with ``tRNS``): composited onto a **white** background. Dropping alpha
  instead (what ``convert("RGB")`` does) exposes whatever colour the invisible pixels happen to hold,
  often black or noise; white is what the image looks like on a page.
* ``I;16*`` (16-bit PNG and TIFF greyscale, and ``I`` from a PNG, as older Pillow opens 16-bit PNGs):
  scaled from 0..65535 to 0..255 (``value // 257``) rather than clipped at 255, which would turn most of
  the image white.
* ``F`` and ``I`` (float and 32-bit integer TIFFs, e.g. scientific or depth images): their values have no
  fixed range, so they are scaled linearly from their own minimum..maximum to 0..255 (NaN and infinities
  become 0; a flat image becomes black). Pillow's ``convert("RGB")`` clips them, which turns floats in
  0..1 flat black and most 32-bit images flat white.

The EXIF orientation tag is applied (``ImageOps.exif_transpose``; for plain JPEGs decoded by OpenCV, by
OpenCV, with the same result) before conversion.

**Similarity**: a perceptual hash for the scan and crop-aware thumbnail correlation.

Both work on the decoded RGB array (`decode_image`), in greyscale, so a copy that was resized or
re-encoded (JPEG quality, PNG↔JPEG) looks the same to them while two different photos, or two
different writers' ``7``, do not.

* `perceptual_hash`: the 64-bit DCT hash (pHash): the image shrunk to 32×32, its 8×8 lowest-frequency
  DCT coefficients, one bit per coefficient above their median. The scan stores it for every image,
  so ``finetune train``'s quick leakage check costs no extra decoding: images with the **same** hash in
  different splits are reported. Resized and re-encoded copies keep their hash; a crop usually does
  not (``finetune data audit`` finds those).
* `thumbnail_views` and `view_similarity`: the image as 24×24 greyscale, mean-removed, unit-norm
  vectors, whole and centre/corner-cropped by 3, 6 and 10 % per side. The similarity of two images is
  the largest correlation of one's views with the other's whole view, so a copy cropped by up to
  about 10 % still lines up with its original. `finetune data audit` confirms near-duplicate candidates
  with it; `thumbnail_vector` (the whole view alone) is what it searches for thumbnail neighbours.

**The scan** before training: decode every image once to find the bad ones, and hash it to find duplicates.

Each file is read once; its bytes are hashed (SHA-256) and decoded by the same `decode_image` that
training uses, so a file the scan passes is a file training can read. Files are scanned on a thread
pool: Pillow's decoders and hashlib release the GIL.

**The resize cache**, `resize_cache`: decode and shrink every image once, so that training epochs read small copies.

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

import csv
import hashlib
import io
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune._io import atomic_write_bytes, atomic_write_text
from finetune._workers import usable_cpus
from finetune.data._scan_cache import file_stamp, is_settled, ScanCache
from finetune.errors import FinetuneError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""Suffixes recognised as images, compared case-insensitively (``.JPG`` counts)."""

DEFAULT_MAX_PIXELS = 89_478_485
"""Largest width × height accepted: Pillow's own ``Image.MAX_IMAGE_PIXELS`` (1 GiB / 4 / 3, about
0.25 GiB as 8-bit RGB). Larger images are rejected as possible decompression bombs before any pixel is
decoded. Pillow itself refuses images over twice its ``Image.MAX_IMAGE_PIXELS`` whatever is asked here,
so raise that too for limits above 178,956,970."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_UNBOUNDED_MODES = frozenset({"F", "I"})  # float32, int32: no fixed range


class ImageDecodeError(FinetuneError):
    """An image file that cannot be used, with the reason.

    Attributes:
        path: The file.
        reason: Why it cannot be used, e.g. ``"empty file (0 bytes)"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def is_image_file(name: str) -> bool:
    """Whether a file name has an image suffix (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> np.ndarray:
    """Read an image file as an H×W×3 uint8 RGB array (see the module docstring for conversions).

    Args:
        path: Image file.
        max_pixels: Largest width × height accepted (default `DEFAULT_MAX_PIXELS`).
        min_side: The smallest shorter side the caller needs, when it shrinks the image anyway: a JPEG at
            least twice that is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (the largest
            that keeps ``min_side``), several times faster and already antialiased. None: full size.

    Returns:
        A writable, C-contiguous H×W×3 uint8 array.

    Raises:
        ImageDecodeError: The file is missing, empty, not an image, truncated or corrupt, or too large.
    """
    return decode_image(read_file(path), path, max_pixels, min_side)[0]


def read_file(path: str | os.PathLike) -> bytes:
    """A regular file's bytes (symlinks followed), or `ImageDecodeError` when it cannot be read.

    Anything else named like an image is refused without reading it: opening a FIFO for reading blocks
    until a writer comes (forever), and a device or socket is not an image either.
    """
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind:
            raise ImageDecodeError(path, f"not a regular file ({kind})")
        # O_NONBLOCK: should the path have become a FIFO since the stat, the open returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            kind = _not_regular(os.fstat(fd).st_mode)
            if kind:
                raise ImageDecodeError(path, f"not a regular file ({kind})")
            return f.read()
    except FileNotFoundError as e:
        reason = "broken symbolic link (its target does not exist)" if os.path.islink(path) else e.strerror
        raise ImageDecodeError(path, f"cannot read file: {reason}") from e
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file: {e.strerror or e}") from e


def _not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is, when it is not a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def decode_image(data: bytes, path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> tuple[np.ndarray, str]:
    """Decode an image file's bytes; `load_image` for callers that already hold the bytes.

    Args:
        data: The file's content.
        path: The file's name, for error messages.
        max_pixels: Largest width × height accepted.
        min_side: As in `load_image`.

    Returns:
        The H×W×3 uint8 RGB array and the file's original Pillow mode (``"L"``, ``"CMYK"`` ...).

    Raises:
        ImageDecodeError: The data is empty, not an image, truncated or corrupt, or too large.
    """
    image, mode, _ = _decode(data, path, max_pixels, min_side)
    return image, mode


def _decode(data: bytes, path: str | os.PathLike, max_pixels: int,
            min_side: int | None) -> tuple[np.ndarray, str, tuple[int, int]]:
    """`decode_image`, plus the full-size image's (height, width) after EXIF orientation (the array's own
    shape unless it was decoded at a reduced scale)."""
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(path, _too_large(width, height, max_pixels))
            mode = img.mode
            fast = _decode_with_opencv(data, img, _reduction(img, min_side))
            if fast is not None:
                return fast[0], mode, fast[1]
            image = _to_rgb(ImageOps.exif_transpose(img), img.format)
            return image, mode, image.shape[:2]
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"too many pixels (decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(path, "not an image (unrecognised format)") from e
    except Exception as e:
        # Decoder plugins raise many types on malformed input (OSError, SyntaxError, ValueError,
        # struct.error, IndexError...); all of them mean the same thing here: the file is unusable.
        raise ImageDecodeError(path, f"corrupt image data: {e}") from e


_EXIF_ORIENTATION = 0x0112
# Complete files end with these markers; a truncated one goes through Pillow, which reports it.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


# OpenCV >= 4.10 decodes straight to RGB; older ones give BGR, converted (far cheaper than a reversed copy)
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _reduction(img: Image.Image, min_side: int | None) -> int:
    """The largest DCT scale-down (1, 2, 4 or 8) of a JPEG that keeps its shorter side at least ``min_side``."""
    if not min_side or img.format != "JPEG":
        return 1
    short = min(img.size)
    return next(k for k in (8, 4, 2, 1) if k == 1 or short // k >= min_side)


def _decode_with_opencv(data: bytes, img: Image.Image, reduction: int = 1) -> tuple[np.ndarray, tuple[int, int]] | None:
    """OpenCV's decode for the plain cases where it gives Pillow's pixels faster (JPEG 1.3-1.5x, PNG
    1.1-3x: benchmarks/RESULTS.md): complete 8-bit RGB or greyscale JPEG/PNG files without transparency.
    A JPEG's EXIF orientation is applied by OpenCV itself (the same 8 flips and turns as Pillow's
    ``exif_transpose``); a PNG's is left to Pillow. None for anything else, which Pillow decodes with the
    conversions above. Returns the RGB array and the full-size image's oriented (height, width)."""
    marker = _END_MARKERS.get(img.format or "")
    if (
        marker is None
        or img.mode not in ("RGB", "L")
        or "transparency" in img.info
        or (img.format == "PNG" and "exif" in img.info)  # PNG getexif() would decode the image
        or not data.rstrip(b"\0").endswith(marker)
    ):
        return None
    turned = img.format == "JPEG" and img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    if reduction > 1:  # OpenCV's reduced reads are BGR only
        flags, bgr = _REDUCED[reduction], True
    else:
        flags, bgr = _IMREAD_RGB, _IMREAD_RGB == cv2.IMREAD_COLOR
    if img.format != "JPEG":
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    height, width = -(-img.height // reduction), -(-img.width // reduction)  # libjpeg rounds up
    if decoded is None or decoded.shape[:2] != ((width, height) if turned else (height, width)):
        return None
    full = (img.width, img.height) if turned else (img.height, img.width)
    return (cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB) if bgr else decoded), full


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"too many pixels (decompression bomb?): {width}×{height} = {width * height:,} > limit {max_pixels:,}"


def _to_rgb(img: Image.Image, fmt: str | None) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and fmt == "PNG"):
        grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) // 257).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode in _UNBOUNDED_MODES:
        return np.ascontiguousarray(np.repeat(_scale_by_range(np.asarray(img))[:, :, None], 3, axis=2))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        img = background
    return np.array(img.convert("RGB"))


def _scale_by_range(values: np.ndarray) -> np.ndarray:
    """Values of any range as uint8, linearly from their finite minimum..maximum to 0..255."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.round(np.where(finite, scaled, 0)).astype(np.uint8)


THUMBNAIL = 24
"""Side of the greyscale thumbnails `thumbnail_views` correlates."""

CROPS = (0.03, 0.06, 0.10)
"""Crop fractions per side tried by `thumbnail_views`, each centred and anchored at the four corners."""


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def perceptual_hash(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an H×W×3 (or H×W) uint8 image, as an int."""
    small = cv2.resize(_grey(image), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) is left out of the median
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail_vector(image: np.ndarray) -> np.ndarray:
    """The whole image as one unit vector of THUMBNAIL² pixels: the first row of `thumbnail_views`.

    Two images' vectors correlate (dot product) near 1 when they look alike at thumbnail scale, so a
    nearest-neighbour search over them finds copies whatever their embeddings say."""
    return _unit(_grey(image).astype(np.float32))


def thumbnail_views(image: np.ndarray) -> np.ndarray:
    """The whole image and its crops as ``1 + 5·len(CROPS)`` unit vectors (rows, float32) of THUMBNAIL² pixels."""
    grey = _grey(image).astype(np.float32)
    h, w = grey.shape
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for c in CROPS:
        keep = 1.0 - 2 * c
        boxes += [(c, c, 1 - c, 1 - c), (0, 0, keep + c, keep + c), (2 * c, 0, 1, keep + c),
                  (0, 2 * c, keep + c, 1), (2 * c, 2 * c, 1, 1)]
    return np.stack([
        _unit(grey[int(round(y0 * h)):max(int(round(y1 * h)), int(round(y0 * h)) + 1),
                   int(round(x0 * w)):max(int(round(x1 * w)), int(round(x0 * w)) + 1)])
        for x0, y0, x1, y1 in boxes
    ])


def _unit(grey: np.ndarray) -> np.ndarray:
    """A greyscale array as a THUMBNAIL² vector, mean removed, unit norm (zero when it has no contrast)."""
    v = cv2.resize(grey, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).ravel()
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 1e-6 else v


def view_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Crop-aware correlation of two images' `thumbnail_views`: 1.0 for copies, lower for different images.

    An image without contrast (blank, single-colour) correlates 0 with any image, another flat one included:
    its thumbnail says nothing about its content, so any two would score 1.0 (a 1×1 red and a 40×40 green
    image). Whether two such images are copies is `flat_signature`'s to say."""
    if not a[0].any() or not b[0].any():
        return 0.0
    return float(max((a @ b[0]).max(), (b @ a[0]).max()))


FLAT_LEVELS = 2
"""Most a channel of a blank or single-colour image varies (in 0..255 levels, at thumbnail scale)."""


def flat_signature(image: np.ndarray) -> tuple[int, int, int, int, int] | None:
    """``(height, width, r, g, b)`` of a blank or single-colour image (every channel within `FLAT_LEVELS`
    at thumbnail scale), else None. Two such images are copies only when their signatures agree (the same
    size, each channel's mean within `FLAT_LEVELS`): `flat_copies`."""
    rgb = image if image.ndim == 3 else image[:, :, None].repeat(3, axis=2)
    small = cv2.resize(rgb, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).reshape(-1, 3)
    if (small.max(axis=0).astype(int) - small.min(axis=0)).max() > FLAT_LEVELS:
        return None
    r, g, b = (int(round(v)) for v in rgb.reshape(-1, 3).mean(axis=0))
    return rgb.shape[0], rgb.shape[1], r, g, b


def flat_copies(a: tuple | None, b: tuple | None) -> bool:
    """Whether two `flat_signature` values are one blank image: both flat, the same size and colour."""
    return (a is not None and b is not None and a[:2] == b[:2]
            and max(abs(x - y) for x, y in zip(a[2:], b[2:])) <= FLAT_LEVELS)


def colour_name(signature: tuple) -> str:
    """A `flat_signature`'s colour as ``#rrggbb``."""
    return "#" + "".join(f"{v:02x}" for v in signature[2:])


COPY_SIMILARITY = 0.999
"""`view_similarity` at or above which two images count as copies. On the digits (1,797 look-alike 8×8
scans) no two different images reach 0.997, nor do two synthetic stripe images that differ only by
faint noise (0.9982), while resized, re-encoded and 10 %-cropped copies score above 0.9995."""


def hash_leaks(
    paths: Sequence[str],
    splits: Sequence[str],
    hashes: Sequence[int],
    load: Callable[[str], np.ndarray],
    *,
    threshold: float = COPY_SIMILARITY,
    max_groups: int = 1000,
) -> list[list[str]]:
    """Groups of images in more than one split with the same perceptual hash, confirmed as copies by
    `view_similarity` (``finetune train``'s quick leakage check: no backbone, no decoding beyond the
    images whose hash collides across splits, at most ``max_groups`` hash groups). Blank or single-colour
    images all look alike to the hash and the thumbnails: they leak only when `flat_copies` says two are
    one image (same size and colour).

    Args:
        paths: The images (as ``load`` takes them).
        splits: Each image's split.
        hashes: Each image's `perceptual_hash`.
        load: Reads an image as an RGB array.
        threshold: Least similarity of a copy.
        max_groups: Hash groups checked at most (a data set of flat or synthetic images can collide a lot).

    Returns:
        Each leaking group's paths (those that copy another member in another split), sorted.
    """
    by_hash: dict[int, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    groups = [g for g in by_hash.values() if len({splits[i] for i in g}) > 1][:max_groups]
    leaked = []
    for group in groups:
        images = {i: load(paths[i]) for i in group}
        views = {i: thumbnail_views(image) for i, image in images.items()}
        flat = {i: flat_signature(image) for i, image in images.items()}
        members = {
            k for a in group for b in group
            if splits[a] != splits[b] and a < b
            and (flat_copies(flat[a], flat[b]) or view_similarity(views[a], views[b]) >= threshold)
            for k in (a, b)
        }
        if members:
            leaked.append(sorted(paths[i] for i in members))
    return sorted(leaked)


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
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(BadFile._fields)
    writer.writerows(bad)
    return atomic_write_text(path, text.getvalue())


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
    _write_atomic(target, _shrink(image, size, full), quality if jpeg else None)
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


def _write_atomic(path: Path, image: np.ndarray, jpeg_quality: int | None) -> None:
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
