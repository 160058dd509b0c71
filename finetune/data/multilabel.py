"""Multi-label data: a labels CSV (`LabelsTable`), its seeded iterative-stratified split, its statistics.

**CSV format** (UTF-8, a byte-order mark accepted)::

    path,labels,split
    photos/0001.jpg,bird;feeder,train
    photos/0002.jpg,,val

* ``path``: the image, relative to the root (the CSV's folder unless given), ``/`` separators; absolute paths
  and ``..`` are refused, as in split manifests.
* ``labels``: the image's labels separated by ``;`` (or the separator given), blanks around them dropped; empty
  means no label (an image may show none of the classes).
* ``split`` (optional): ``train``, ``val`` (``valid``, ``validation``) or ``test``; without the column the table
  is split by `split_labels`. Other columns are ignored.

The classes are the sorted union of the labels; an image's target is its multi-hot row of `LabelsTable.matrix`.

`split_labels` stratifies every label at once with iterative stratification (Sechidis, Tsoumakas & Vlahavas,
*On the Stratification of Multi-label Data*, ECML PKDD 2011), through the ``iterative-stratification`` package's
``MultilabelStratifiedShuffleSplit`` (test first, then val from the rest), seeded: the same table and seed give
the same split. Every label must then appear in train, or the split is refused naming it.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from itertools import combinations
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

import numpy as np

from finetune._io import atomic_write_text, csv_text, read_text_file
from finetune.data.layout import SPLIT_ALIASES, SPLITS
from finetune.data.manifest import _check_relative
from finetune.data.prepare import DEFAULT_TEST, DEFAULT_VAL
from finetune.errors import FinetuneError

SEPARATOR = ";"
HEADER = ("path", "labels", "split")


def is_labels_csv(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CSV whose header names a ``labels`` column (a multi-label table)."""
    path = Path(path)
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "labels" in [h.strip() for h in header]


class LabelsTable:
    """Images with a set of labels each, and optionally a split.

    Attributes:
        root: Folder the paths are relative to.
        paths: POSIX paths relative to ``root``.
        labels: Each image's labels (a sorted tuple; empty for no label).
        splits_list: Each image's split, or None before `split_labels` (`splits()`: the splits present).
        classes: The sorted union of the labels.
    """

    def __init__(self, root: str | os.PathLike, paths, labels, splits=None):
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = [tuple(sorted(set(ls))) for ls in labels]
        self.splits_list = list(splits) if splits is not None else [None] * len(self.paths)
        self.classes = sorted({label for ls in self.labels for label in ls})
        self._index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.paths)

    task = "multilabel"

    def splits(self) -> list[str]:
        """The splits that hold at least one image, in ``train, val, test`` order."""
        return [s for s in SPLITS if s in set(self.splits_list)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Split → label → images showing it."""
        counts = {s: dict.fromkeys(self.classes, 0) for s in self.splits()}
        for labels, split in zip(self.labels, self.splits_list):
            for label in labels:
                counts[split][label] += 1
        return counts

    def matrix(self) -> np.ndarray:
        """N × C uint8 multi-hot targets, columns in the order of ``classes``."""
        out = np.zeros((len(self.paths), len(self.classes)), np.uint8)
        for row, labels in enumerate(self.labels):
            out[row, [self._index[label] for label in labels]] = 1
        return out

    def items(self, split: str) -> list[tuple[Path, np.ndarray]]:
        """``(absolute path, float32 multi-hot target)`` of the images of ``split``."""
        targets = self.matrix().astype(np.float32)
        return [(self.root / p, targets[i]) for i, (p, s) in enumerate(zip(self.paths, self.splits_list)) if s == split]

    def write_csv(self, path: str | os.PathLike, separator: str = SEPARATOR) -> Path:
        """Write the table (``path,labels,split``, rows by split then path) atomically."""
        order = sorted(range(len(self.paths)),
                       key=lambda i: (SPLITS.index(self.splits_list[i]) if self.splits_list[i] else -1, self.paths[i]))
        rows = [(self.paths[i], separator.join(self.labels[i]), self.splits_list[i] or "") for i in order]
        return atomic_write_text(path, csv_text(HEADER, rows))


def read_labels_csv(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                    separator: str = SEPARATOR, check_files: bool = True) -> LabelsTable:
    """Read a labels CSV (the module docstring), validating every row.

    Args:
        path: The CSV.
        root: Folder the paths are relative to (a folder of images given with ``--labels``); default the CSV's.
        separator: What separates an image's labels.
        check_files: Refuse a row whose image file does not exist.

    Raises:
        FinetuneError: no ``path`` or ``labels`` column; a row naming a missing file, an absolute or climbing
            path, a path listed twice, an unknown split; no row; no label anywhere. One line, naming the row.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    reader = csv.reader(io.StringIO(read_text_file(path, "labels CSV"), newline=""))
    header = [h.strip() for h in next(reader, [])]
    if "path" not in header or "labels" not in header:
        raise FinetuneError(f"{path}: a labels CSV needs 'path' and 'labels' columns, got {','.join(header)!r}")
    at = {name: header.index(name) for name in ("path", "labels", "split") if name in header}
    paths, labels, splits, seen = [], [], [], {}
    for record in reader:
        where = f"{path}:{reader.line_num}"
        if not any(field.strip() for field in record):
            continue
        if len(record) < len(header):
            raise FinetuneError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(record)}")
        rel = record[at["path"]].strip()
        _check_relative(rel, where)
        rel = PurePosixPath(rel).as_posix()
        if rel in seen:
            raise FinetuneError(f"{where}: {rel!r} is listed twice (first on line {seen[rel]})")
        seen[rel] = reader.line_num
        if check_files and not (root / rel).is_file():
            raise FinetuneError(f"{where}: {rel!r} is not a file under {root}")
        split = record[at["split"]].strip() if "split" in at else ""
        if split and split not in SPLIT_ALIASES:
            raise FinetuneError(f"{where}: unknown split {split!r} (expected train, val or test)")
        paths.append(rel)
        labels.append([label.strip() for label in record[at["labels"]].split(separator) if label.strip()])
        splits.append(SPLIT_ALIASES[split] if split else None)
    if not paths:
        raise FinetuneError(f"{path}: the labels CSV lists no image")
    if not any(labels):
        raise FinetuneError(f"{path}: the labels column is empty on every row: no image has a label")
    if any(splits) and not all(splits):
        missing = splits.index(None)
        raise FinetuneError(f"{path}: {paths[missing]!r} has no split while other rows have one; give every row a "
                            "split, or none (then `finetune data split` makes one)")
    table = LabelsTable(root, paths, labels, splits if all(splits) else None)
    if all(splits):
        check_train_has_every_label(table, str(path))
    return table


def check_train_has_every_label(table: LabelsTable, where: str) -> None:
    """Refuse a split whose train part lacks a label another split has (a class that never trains). A table with
    no train rows (images to evaluate) has nothing to check."""
    if "train" not in table.splits_list:
        return
    in_train = {label for ls, s in zip(table.labels, table.splits_list) if s == "train" for label in ls}
    for labels, split in zip(table.labels, table.splits_list):
        for label in labels:
            if label not in in_train:
                raise FinetuneError(f"{where}: label {label!r} appears in {split} but never in train")


def split_labels(table: LabelsTable, *, val: float = 0.15, test: float = 0.15, seed: int = 0) -> LabelsTable:
    """The table with every image given a split by seeded iterative stratification (every label's share kept in
    each split as far as the counts allow).

    Raises:
        FinetuneError: fractions outside [0, 1) or summing to 1 or more; a label left out of train (too rare).
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise FinetuneError(f"val ({val}) and test ({test}) must lie in [0, 1) and sum to less than 1")
    y = table.matrix()
    index = np.arange(len(table))
    splits = np.array(["train"] * len(table), dtype=object)
    rest = index
    if test > 0:
        rest, chosen = _stratified(y, index, test, seed)
        splits[chosen] = "test"
    if val > 0:
        _, chosen = _stratified(y, rest, val / (1 - test), seed + 1)
        splits[chosen] = "val"
    out = LabelsTable(table.root, table.paths, table.labels, splits.tolist())
    check_train_has_every_label(out, "the split")
    return out


def _stratified(y: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept and rows taken (``fraction`` of ``rows``), stratified over every column of ``y``."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit  # lazy: only a multi-label split needs it

    if len(rows) < 2 or round(fraction * len(rows)) < 1:
        return rows, rows[:0]
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    keep, take = next(splitter.split(np.zeros(len(rows)), y[rows]))
    return rows[np.sort(keep)], rows[np.sort(take)]


def label_statistics(table: LabelsTable, top: int = 10) -> dict:
    """What ``finetune data inspect`` reports of a multi-label table (JSON-serialisable): images and label counts
    per split, label cardinality (mean labels per image), images without a label, the most frequent label pairs."""
    splits = sorted({s or "all" for s in table.splits_list}, key=lambda s: SPLITS.index(s) if s in SPLITS else -1)
    counts = {s: {c: 0 for c in table.classes} for s in splits}
    images = Counter()
    for labels, split in zip(table.labels, table.splits_list):
        images[split or "all"] += 1
        for label in labels:
            counts[split or "all"][label] += 1
    pairs = Counter(pair for labels in table.labels for pair in combinations(labels, 2))
    sizes = [len(ls) for ls in table.labels]
    return {
        "root": str(table.root), "task": "multilabel", "num_images": len(table), "classes": table.classes,
        "images": dict(images), "label_counts": counts,
        "cardinality": float(np.mean(sizes)) if sizes else 0.0, "max_labels": max(sizes, default=0),
        "without_label": sum(1 for s in sizes if s == 0),
        "top_pairs": [{"labels": list(p), "images": n} for p, n in pairs.most_common(top)],
    }


def labels_like_run(data: str | os.PathLike, recipe_data: Mapping, run_manifest: str | os.PathLike | None = None
                    ) -> LabelsTable:
    """The labels table of ``data`` split as a multi-label checkpoint's run split it (the multi-label
    :func:`~finetune.data.prepare.split_like_run`).

    ``data`` is a labels CSV, or the folder its paths are relative to. In order: the CSV's own split column; the
    run's ``manifest.csv`` when all its files are under the data's root; the CSV split with the recipe's seed and
    fractions (:func:`split_labels`). A folder takes the run's manifest, else the recipe's ``data.manifest``.

    Raises:
        FinetuneError: ``data`` does not exist; a folder with neither a run manifest nor a recipe labels CSV;
            `read_labels_csv`'s errors.
    """
    data = Path(data)
    if not data.exists():
        raise FinetuneError(f"no such data folder or labels CSV: {data}")
    recipe_root = recipe_data.get("root")
    if data.is_file():
        root = Path(recipe_root) if recipe_root and Path(recipe_root).is_dir() else data.parent
        table = read_labels_csv(data, root=root)
        if table.splits():
            return table
    else:
        root, table = data, None
    if run_manifest is not None and Path(run_manifest).is_file():
        run_table = read_labels_csv(run_manifest, root=root, check_files=False)
        if all((root / p).is_file() for p in run_table.paths):
            return run_table
    if table is None:
        source = recipe_data.get("manifest")
        if not source or not is_labels_csv(source):
            raise FinetuneError(f"{data} is a folder: give the labels CSV of its images (--data LABELS.csv)")
        table = read_labels_csv(source, root=root)
        if table.splits():
            return table

    def fraction(key: str) -> float:
        value = recipe_data.get(key)
        return {"val": DEFAULT_VAL, "test": DEFAULT_TEST}[key] if value is None else float(value)

    return split_labels(table, val=fraction("val"), test=fraction("test"), seed=int(recipe_data.get("seed") or 0))


def targets_for(table: LabelsTable, splits: Sequence[str], classes: Sequence[str]) -> list[tuple[Path, np.ndarray]]:
    """``(absolute path, float32 multi-hot target over classes)`` of the images of ``splits``: a model's label
    order, whatever the table's.

    Raises:
        FinetuneError: a label the model does not know, named with the split and an image showing it.
    """
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for rel, labels, split in zip(table.paths, table.labels, table.splits_list):
        if split not in splits:
            continue
        target = np.zeros(len(classes), np.float32)
        for label in labels:
            if label not in index:
                raise FinetuneError(f"unknown label {label!r} in the {split} split ({rel}): the checkpoint's labels "
                                    f"are {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}")
            target[index[label]] = 1
        out.append((table.root / rel, target))
    return out
