"""The split manifest (`Manifest`): which image is in which split with which class, written once and reused.

**CSV format** (UTF-8, ``\n`` line ends, standard CSV quoting)::

    path,class,split
    train/AFRICAN CROWNED CRANE/001.jpg,AFRICAN CROWNED CRANE,train
    Faces/image_0001.jpg,Faces,test

* ``path``: the image, relative to the dataset root, with ``/`` separators. Absolute paths and paths
  with a ``..`` component are rejected: a manifest cannot point outside its root (symlinks inside the
  root may, as on disk).
* ``class``: the class name. Label indices are the positions in the sorted list of the manifest's
  class names.
* ``split``: ``train``, ``val`` or ``test`` (``valid`` and ``validation`` are read as ``val``).

Rows are written sorted by split (train, val, test), class, then path, so the same split always gives the
same bytes. The root is not stored: it is the manifest's folder unless given when reading, so a dataset
and its manifest can move together to another machine.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

from finetune._io import atomic_write_text, csv_text, read_text_file
from finetune.data.layout import SPLIT_ALIASES, SPLITS
from finetune import _moved
from finetune.errors import FinetuneError

HEADER = ("path", "class", "split")


class ManifestRow(NamedTuple):
    """One image of a manifest.

    Attributes:
        path: POSIX path relative to the manifest's root.
        label: Class name.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    path: str
    label: str
    split: str


class Manifest:
    """Images of a dataset with their class and split.

    Attributes:
        root: Folder the row paths are relative to.
        rows: The images, sorted by split, class and path.
        classes: Sorted class names; a class's index in this list is its label.
    """

    def __init__(self, root: str | os.PathLike, rows: list[ManifestRow] | tuple[ManifestRow, ...]):
        """Build a manifest.

        Args:
            root: Folder the row paths are relative to.
            rows: The images, in any order.

        Raises:
            FinetuneError: A row has an unknown split or a path appears twice.
        """
        self.root = Path(root)
        self.rows = tuple(sorted(rows, key=lambda r: (SPLITS.index(_split_name(r.split)), r.label, r.path)))
        path, times = Counter(r.path for r in self.rows).most_common(1)[0] if self.rows else ("", 0)
        if times > 1:
            raise FinetuneError(f"the manifest lists {path!r} {times} times")
        self.classes = sorted({r.label for r in self.rows})
        self._index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def from_splits(cls, root: str | os.PathLike, splits: dict[str, dict[str, list[str]]]) -> Manifest:
        """Build a manifest from split → class → paths relative to ``root``."""
        rows = [ManifestRow(p, label, split) for split, per_class in splits.items() for label, paths in per_class.items() for p in paths]
        return cls(root, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={sum(c.values())}" for s, c in self.counts().items())
        return f"Manifest(root={str(self.root)!r}, classes={len(self.classes)}, {counts})"

    def splits(self) -> list[str]:
        """The splits that hold at least one image, in ``train, val, test`` order."""
        present = {r.split for r in self.rows}
        return [s for s in SPLITS if s in present]

    def items(self, split: str) -> list[tuple[Path, int]]:
        """(absolute path, class index) of every image in ``split``.

        Raises:
            FinetuneError: The manifest has no image in ``split``.
        """
        if split not in self.splits():
            raise FinetuneError(f"the manifest has no {split!r} split (it has: {', '.join(self.splits())})")
        return [(self.root / r.path, self._index[r.label]) for r in self.rows if r.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Split → class → number of images, for every present split and every class (zeros included)."""
        counts = {s: dict.fromkeys(self.classes, 0) for s in self.splits()}
        for r in self.rows:
            counts[r.split][r.label] += 1
        return counts

    def without(self, paths: set[str]) -> Manifest:
        """A manifest of the same root without the rows whose path is in ``paths``."""
        return Manifest(self.root, [r for r in self.rows if r.path not in paths])

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write the manifest as CSV (see the module docstring), atomically.

        Returns:
            The path written.
        """
        return atomic_write_text(path, csv_text(HEADER, self.rows))

    @classmethod
    def read_csv(cls, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Manifest:
        """Read a manifest CSV, validating every row.

        Args:
            path: The CSV file.
            root: Folder the row paths are relative to; defaults to the CSV's folder.

        Returns:
            The manifest.

        Raises:
            FinetuneError: The file is missing, has another header, a row with another number of
                fields, an empty class, an unknown split, a path that is absolute or climbs out of the
                root, a path listed twice, or no row at all.
        """
        path = Path(path)
        text = read_text_file(path, "manifest")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is not None and "labels" in [h.strip() for h in header]:
            raise FinetuneError(f"{path} is a multi-label labels CSV (a 'labels' column), not a single-label "
                                "manifest (path,class,split): give it to a command as the data of a multi-label run")
        if header is None or tuple(header) != HEADER:
            raise FinetuneError(f"{path}: not a manifest: the first line must be {','.join(HEADER)!r}, got {header!r}")
        rows = []
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if not record:
                continue
            if len(record) != len(HEADER):
                raise FinetuneError(f"{where}: expected 3 fields (path,class,split), got {len(record)}")
            rel, label, split = record
            _check_relative(rel, where)
            if not label:
                raise FinetuneError(f"{where}: empty class")
            if split not in SPLIT_ALIASES:
                raise FinetuneError(f"{where}: unknown split {split!r} (expected train, val or test)")
            rows.append(ManifestRow(PurePosixPath(rel).as_posix(), label, SPLIT_ALIASES[split]))
        if not rows:
            raise FinetuneError(f"{path}: the manifest lists no image")
        return cls(path.parent if root is None else root, rows)


def _split_name(split: str) -> str:
    if split not in SPLITS:
        raise FinetuneError(f"unknown split {split!r} (expected train, val or test)")
    return split


def _check_relative(rel: str, where: str) -> None:
    """Reject a manifest path that is empty, absolute (POSIX or Windows) or climbs out with ``..``."""
    if not rel:
        raise FinetuneError(f"{where}: empty path")
    windows = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or windows.drive or windows.root:
        raise FinetuneError(f"{where}: path {rel!r} is absolute; manifest paths must be relative to the dataset root")
    if ".." in windows.parts:
        raise FinetuneError(f"{where}: path {rel!r} climbs out of the dataset root with '..'")


# the names that moved to finetune.data.prepare, for one release, with a DeprecationWarning
__getattr__ = _moved.attribute_getter(
    __name__, ("prepare_manifest", "inspect_dataset", "manifest_root", "leaks", "DEFAULT_VAL", "DEFAULT_TEST"),
    "finetune.data.prepare")
