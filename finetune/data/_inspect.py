"""`inspect_dataset`: everything `finetune data inspect` reports about a dataset, as one JSON-ready dict.

Keys (stable; ``finetune data inspect --json`` prints exactly this object):

* ``root`` (str): the dataset root.
* ``layout`` (str): ``"pre-split"``, ``"folder"`` or ``"manifest"``.
* ``split_folders`` (object): split → folder name for a pre-split root (``{"val": "valid", ...}``),
  else ``{}``.
* ``classes`` (list of str): sorted class names; the index is the label.
* ``counts`` (object): split → class → number of **usable** images, every class listed. A one-folder
  root, not split yet, has the single split ``"all"``.
* ``num_images`` (int): usable images in all.
* ``image_size`` (object or null): ``{"width": {"min", "median", "max"}, "height": {...}}`` in pixels,
  after EXIF orientation, over usable images; null when there is none.
* ``modes`` (object): Pillow mode of the files (``"RGB"``, ``"L"``, ``"CMYK"``, ``"P"``...) → count.
* ``bad_files`` (list): ``{"path", "reason"}`` per unusable file, sorted by path.
* ``duplicates`` (list): ``{"paths", "splits", "leak"}`` per group of byte-identical usable files;
  ``splits`` lists the splits the copies are in and ``leak`` is true when that is more than one.
"""
from __future__ import annotations

import os
import statistics
from collections import Counter
from pathlib import Path

from finetune.data._decode import DEFAULT_MAX_PIXELS
from finetune.data._layout import SPLITS, UNSPLIT, discover
from finetune.data._manifest import Manifest, ManifestRow
from finetune.data._scan import bad_files, duplicate_groups, scan_images


def inspect_dataset(root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Scan a dataset folder or manifest and describe it (keys in the module docstring).

    Args:
        root: A dataset folder or a manifest CSV (whose root is its folder).
        max_pixels: Largest width × height accepted.

    Returns:
        The description, JSON-serialisable.

    Raises:
        FinetuneError: The folder or manifest cannot be read (see `discover`, `Manifest.read_csv`).
    """
    root = Path(root)
    if root.is_file():
        manifest = Manifest.read_csv(root)
        root, rows, classes = manifest.root, manifest.rows, manifest.classes
        layout, split_folders = "manifest", {}
    else:
        found = discover(root)
        rows = [ManifestRow(p, c, s) for s, per_class in found.images.items() for c, paths in per_class.items() for p in paths]
        classes = found.classes
        layout, split_folders = found.layout, found.split_dirs
    results = scan_images(root, [r.path for r in rows], max_pixels=max_pixels)
    bad = bad_files(results)
    bad_paths = {b.path for b in bad}
    split_of = {r.path: r.split for r in rows}
    present = set(split_of.values())
    counts = {s: dict.fromkeys(classes, 0) for s in (*SPLITS, UNSPLIT) if s in present}
    for row in rows:
        if row.path not in bad_paths:
            counts[row.split][row.label] += 1
    duplicates = []
    for paths in duplicate_groups(results):
        splits = [s for s in counts if s in {split_of[p] for p in paths}]
        duplicates.append({"paths": paths, "splits": splits, "leak": len(splits) > 1})
    good = [r for r in results if r.reason is None]
    return {
        "root": str(root),
        "layout": layout,
        "split_folders": split_folders,
        "classes": classes,
        "counts": counts,
        "num_images": len(good),
        "image_size": _size_stats(good),
        "modes": dict(sorted(Counter(r.mode for r in good).items())),
        "bad_files": [{"path": b.path, "reason": b.reason} for b in bad],
        "duplicates": duplicates,
    }


def _size_stats(good) -> dict | None:
    if not good:
        return None
    return {
        axis: {"min": min(values), "median": statistics.median(values), "max": max(values)}
        for axis, values in (("width", [r.width for r in good]), ("height", [r.height for r in good]))
    }
