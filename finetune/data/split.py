"""Seeded, stratified splitting of one folder of class sub-folders into train/val/test.

`prepare_manifest` splits the usable images only (the scan comes first), so counts below are of usable
images and a bad file is split as if it were absent.

**The rule.** Within each class, every image gets the key ``sha256(f"{seed}:{path}")`` (``path`` relative
to the root, POSIX form) and the class's images are ordered by key. The split sizes of the class are
computed from its image count, and consecutive runs of that order are assigned:

* by fractions (``val``, ``test``): the first ``round(test × n)`` images go to test, the next
  ``round(val × n)`` to val, the rest to train;
* by a fixed number of training images (``train_per_class=N``): the first ``N`` go to train; of the
  ``r`` remaining, the first ``round(val × r)`` go to val and the rest to test (so ``val`` is a fraction
  of what is left after training, and training keeps exactly ``N`` as the protocol asks).

Rounding is half-up. A class keeps at least one image in train and, where it has enough images, at
least one in each split asked for (a non-zero fraction; test always under ``train_per_class``);
``N`` is lowered to keep one test image. Shortfalls are logged, one line per split.

**Consequences.** No random generator is involved, so the same seed, files and options give the same
assignment on any machine and with any Python or NumPy version. An image's key does not depend on the
other files, so adding (or removing) images leaves the order of the existing ones unchanged: each split
boundary moves by at most the number of images added to the class, so only existing images next to a
boundary can change split, and a class that gains no image is not touched at all. A different seed is a
different split.
"""
from __future__ import annotations

import hashlib
import logging
import math

from finetune.data.layout import short_list
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)


def validate_split_options(val: float, test: float, train_per_class: int | None) -> None:
    """Check split options, raising `FinetuneError` naming the bad one."""
    if not 0 <= val < 1:
        raise FinetuneError(f"val must be a fraction in [0, 1), got {val}")
    if train_per_class is not None:
        if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 1:
            raise FinetuneError(f"train_per_class must be a positive integer, got {train_per_class!r}")
        return
    if not 0 <= test < 1:
        raise FinetuneError(f"test must be a fraction in [0, 1), got {test}")
    if val + test >= 1:
        raise FinetuneError(f"val + test must be below 1 to leave images for training, got {val} + {test}")


def split_classes(
    images: dict[str, list[str]],
    *,
    val: float,
    test: float,
    train_per_class: int | None,
    seed: int,
) -> dict[str, dict[str, list[str]]]:
    """Split each class's images by the module's rule.

    Args:
        images: Class → image paths relative to the root.
        val: Fraction for val (of the class, or of what is left after ``train_per_class``).
        test: Fraction for test; ignored with ``train_per_class`` (the rest is test).
        train_per_class: Fixed number of training images per class, or None to split by fractions.
        seed: Seed of the keys that order each class.

    Returns:
        Split → class → paths (sorted), for the splits that received images.
    """
    validate_split_options(val, test, train_per_class)
    # The fewest images a class should have in each split; fewer is a logged shortfall.
    minimum = {"train": train_per_class or 1, "val": int(val > 0), "test": int(train_per_class is not None or test > 0)}
    out: dict[str, dict[str, list[str]]] = {}
    short: dict[str, list[str]] = {}
    for label, paths in images.items():
        order = sorted(paths, key=lambda p: (_key(seed, p), p))
        sizes = _sizes(len(order), val, test, train_per_class)
        start = 0
        for split, size in sizes:
            if size:
                out.setdefault(split, {})[label] = sorted(order[start : start + size])
            start += size
            if size < minimum[split]:
                short.setdefault(split, []).append(f"{label!r} (n={len(order)})")
    for split, labels in short.items():
        need = f"{train_per_class} images" if split == "train" and train_per_class else "any image"
        logger.warning("%s: %d class(es) too small to get %s: %s", split, len(labels), need, short_list(labels))
    return out


def _key(seed: int, path: str) -> bytes:
    return hashlib.sha256(f"{seed}:{path}".encode()).digest()


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _sizes(n: int, val: float, test: float, train_per_class: int | None) -> list[tuple[str, int]]:
    """Split sizes of one class of ``n`` images, in the order their runs are taken from the key order."""
    if train_per_class is not None:
        n_train = min(train_per_class, max(n - 1, 1))
        rest = n - n_train
        n_val = _at_least_one(_round(val * rest), val, rest - 1)
        return [("train", n_train), ("val", n_val), ("test", rest - n_val)]
    n_test = _at_least_one(_round(test * n), test, n - 1)
    n_val = _at_least_one(_round(val * n), val, n - 1 - n_test)
    return [("test", n_test), ("val", n_val), ("train", n - n_test - n_val)]


def _at_least_one(size: int, fraction: float, available: int) -> int:
    """``size`` raised to 1 when its fraction asks for images, capped at ``available`` (never negative)."""
    if fraction > 0:
        size = max(size, 1)
    return max(0, min(size, available))
