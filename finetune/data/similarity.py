"""Pixel similarity: a perceptual hash for the scan and crop-aware thumbnail correlation.

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
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

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
    digests: Sequence[str] | None = None,
    verdicts=None,
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
        digests: Each image's content hash (the scan's SHA-256), which keys ``verdicts``.
        verdicts: Known pair verdicts (`~finetune.data._scan_cache.PairVerdicts`): a pair it knows is not
            decoded again, and the new ones are recorded in it.

    Returns:
        Each leaking group's paths (those that copy another member in another split), sorted.
    """
    by_hash: dict[int, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    groups = [g for g in by_hash.values() if len({splits[i] for i in g}) > 1][:max_groups]
    pairs = [[(a, b) for a in g for b in g if a < b and splits[a] != splits[b]] for g in groups]

    def key(a: int, b: int) -> tuple[str, str]:
        return tuple(sorted((digests[a], digests[b])))

    known = verdicts.load([key(a, b) for g in pairs for a, b in g]) if verdicts is not None and digests else {}
    learned: dict[tuple[str, str], bool] = {}
    leaked = []
    for group in pairs:
        unknown = [(a, b) for a, b in group if not digests or key(a, b) not in known]
        needed = {i for pair in unknown for i in pair}
        images = {i: load(paths[i]) for i in sorted(needed)}  # only the images of pairs not judged before
        views = {i: thumbnail_views(image) for i, image in images.items()}
        flat = {i: flat_signature(image) for i, image in images.items()}
        members = set()
        for a, b in group:
            if digests and key(a, b) in known:
                copy = known[key(a, b)]
            else:
                copy = flat_copies(flat[a], flat[b]) or view_similarity(views[a], views[b]) >= threshold
                if digests:
                    learned[key(a, b)] = copy
            if copy:
                members |= {a, b}
        if members:
            leaked.append(sorted(paths[i] for i in members))
    if verdicts is not None and learned:
        verdicts.store(learned)
    return sorted(leaked)


def verdict_settings(threshold: float = COPY_SIMILARITY) -> str:
    """What a pair verdict of `hash_leaks` depends on besides the two files."""
    return f"threshold={threshold} thumbnail={THUMBNAIL} crops={CROPS} flat={FLAT_LEVELS}"
