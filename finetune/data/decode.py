"""Decoding image files: every file becomes an H×W×3 uint8 RGB array, or an `ImageDecodeError` with a reason.

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
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
