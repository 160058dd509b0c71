"""Finding images on disk: which layout a dataset root has, its classes, and the image files of each.

Two layouts are recognised:

* **pre-split**: the root holds ``train/``, exactly one of ``val/``, ``valid/``, ``validation/``, and
  optionally ``test/`` (names compared case-insensitively), each holding one folder per class, as
  Bird-225 ships. Every split must have the same class folders.
* **folder**: the root holds one folder per class and nothing is split yet, as Caltech-101's
  ``101_ObjectCategories``.

A class folder's images are all files with an image suffix (`IMAGE_EXTENSIONS`, any case) anywhere below
it, nested folders included. Hidden files and folders (name starting with ``.``) and other files are
ignored; a class folder holding no image is ignored. A folder named like an image (``shots.png/``) is listed
as a file, so the scan reports it as a bad file ("not a regular file (a folder)"); its contents are not
walked. Symlinked folders and files are followed, but a link back to a folder already walked or to one of
its ancestors (a cycle) is not. A folder that cannot be listed (permissions, I/O errors) is an error naming
it: skipping it would silently drop a class or part of one.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from finetune.data.decode import is_image_file
from finetune import _moved
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
"""Canonical split names, in order."""
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Folder (or manifest) split names and the canonical split each stands for."""
UNSPLIT = "all"
"""The pseudo-split holding every image of a `folder` layout before it is split."""

PRE_SPLIT = "pre-split"
FOLDER = "folder"


@dataclass(frozen=True)
class DatasetFolder:
    """The images found under a dataset root.

    Attributes:
        root: The dataset root.
        layout: ``"pre-split"`` or ``"folder"``.
        split_dirs: Canonical split → folder name under the root (``{"val": "valid", ...}``); empty for
            the folder layout.
        images: Split (``"all"`` for the folder layout) → class → image paths relative to the root, as
            sorted POSIX strings.
    """

    root: Path
    layout: str
    split_dirs: dict[str, str]
    images: dict[str, dict[str, list[str]]]

    @property
    def classes(self) -> list[str]:
        """Sorted class names (every split has the same ones)."""
        return sorted(next(iter(self.images.values())))

    def without(self, exclude: list[str] | tuple[str, ...]) -> DatasetFolder:
        """A copy without the named classes; names that are not classes are logged and ignored."""
        unknown = sorted(set(exclude) - set(self.classes))
        if unknown:
            logger.warning("exclude: no class named %s under %s", ", ".join(map(repr, unknown)), self.root)
        images = {s: {c: p for c, p in per_class.items() if c not in exclude} for s, per_class in self.images.items()}
        if not next(iter(images.values())):
            raise FinetuneError(f"every class under {self.root} is excluded")
        return DatasetFolder(self.root, self.layout, self.split_dirs, images)


def discover(root: str | os.PathLike) -> DatasetFolder:
    """Detect the layout of ``root`` and list its images.

    Args:
        root: A dataset root folder.

    Returns:
        The layout, split folders and images found.

    Raises:
        FinetuneError: ``root`` is not a folder, has ``train/`` but no single validation folder, holds no
            class folder with images, or its splits have different class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(f"dataset root {root} is not a folder")
    subdirs = _subdirs(root)
    by_alias: dict[str, list[str]] = {}
    for name in subdirs:
        split = SPLIT_ALIASES.get(name.lower())
        if split:
            by_alias.setdefault(split, []).append(name)
    if "train" not in by_alias:
        split_dirs = {}
        images = {UNSPLIT: _class_images(root, root)}
        layout = FOLDER
    else:
        val_dirs = by_alias.get("val", [])
        if len(val_dirs) != 1:
            found = f"both {' and '.join(d + '/' for d in val_dirs)}" if val_dirs else "none"
            raise FinetuneError(
                f"{root} has {by_alias['train'][0]}/ so it looks pre-split, but needs exactly one validation folder "
                f"named val/, valid/ or validation/ (found {found})"
            )
        for split, names in by_alias.items():
            if len(names) > 1:
                raise FinetuneError(f"{root} has several {split} folders: {', '.join(n + '/' for n in names)}")
        split_dirs = {s: by_alias[s][0] for s in SPLITS if s in by_alias}
        images = {s: _class_images(root, root / d) for s, d in split_dirs.items()}
        _check_same_classes(images, split_dirs)
        layout = PRE_SPLIT
    if not any(images.values()):
        raise FinetuneError(f"no class folders with images under {root}")
    return DatasetFolder(root, layout, split_dirs, images)


def find_images(folder: Path, root: Path) -> list[str]:
    """Image files anywhere below ``folder``, as sorted POSIX paths relative to ``root``.

    Symlinks are followed; a folder whose real path was already walked, or that is an ancestor of
    ``folder`` (a link cycle), is skipped.

    Args:
        folder: Folder to search (``root`` or below it, possibly through symlinks).
        root: The folder the returned paths are relative to.

    Returns:
        Sorted relative POSIX paths.
    """
    top = os.path.realpath(folder)
    walked = {top}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_unlistable, followlinks=True):
        keep = []
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"  # string joins: a pathlib join per file costs more than the walk
        for name in sorted(dirnames):  # sorted: when two links reach one folder, the first name wins
            if name.startswith("."):
                continue
            if is_image_file(name):  # a folder named like an image: listed, so the scan reports it as bad
                found.append(prefix + name)
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in walked or os.path.commonpath([real, top]) == real:
                continue  # a second link to a folder already walked, or a cycle back up
            walked.add(real)
            keep.append(name)
        dirnames[:] = keep
        found.extend(prefix + name for name in filenames if is_image_file(name))
    return sorted(found)


def _unlistable(error: OSError) -> None:
    """``os.walk``'s error hook: a folder that cannot be listed (permissions, I/O) is an error naming it.

    ``os.walk`` skips such a folder silently by default, which drops a whole class without a word."""
    raise FinetuneError(f"cannot list folder {error.filename}: {error.strerror or error}"
                        " (its images would be left out; fix its permissions or move it out of the dataset)")


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``, or `FinetuneError` naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        e.filename = e.filename or str(folder)
        _unlistable(e)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that cannot be followed (ELOOP, EACCES): not a folder we can use
        return False


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in _entries(folder) if not e.name.startswith(".") and _is_dir(e))


def _class_images(root: Path, split_dir: Path) -> dict[str, list[str]]:
    classes = {}
    split_real = os.path.realpath(split_dir)
    for name in _subdirs(split_dir):
        real = os.path.realpath(split_dir / name)
        if os.path.commonpath([real, split_real]) == real:
            logger.warning("ignoring class folder %s: a link back to %s, which contains it", split_dir / name, real)
            continue
        images = find_images(split_dir / name, root)
        if images:
            classes[name] = images
    loose = sum(1 for e in _entries(split_dir) if is_image_file(e.name) and not _is_dir(e))
    if loose:
        logger.warning("ignoring %d image(s) directly in %s: images must be inside a class folder", loose, split_dir)
    return classes


def _check_same_classes(images: dict[str, dict[str, list[str]]], split_dirs: dict[str, str]) -> None:
    every = set().union(*(per_class.keys() for per_class in images.values()))
    problems = []
    for split, per_class in images.items():
        missing = sorted(every - per_class.keys())
        if missing:
            problems.append(f"{split_dirs[split]}/ lacks {short_list(map(repr, missing))}")
    if problems:
        raise FinetuneError("class folders differ between splits: " + "; ".join(problems))


def short_list(items: Iterable[str], limit: int = 10) -> str:
    """``"a, b, c"``, cut after ``limit`` items with ``" and N more"``, for one-line messages."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# the names that moved to finetune.data.split, for one release, with a DeprecationWarning
__getattr__ = _moved.attribute_getter(__name__, ('split_classes', 'validate_split_options'), "finetune.data.split")
