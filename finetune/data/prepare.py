"""`prepare_manifest`: from a dataset root, a manifest or a card to the manifest of usable images.

`inspect_dataset`: everything `finetune data inspect` reports about a dataset, as one JSON-ready dict.

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

import logging
import os
import statistics
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from finetune.data._scan_cache import PairVerdicts, default_scan_cache
from finetune.data.cards import load_card
from finetune.data.decode import DEFAULT_MAX_PIXELS, load_image
from finetune.data.layout import (
    PRE_SPLIT,
    SPLITS,
    UNSPLIT,
    DatasetFolder,
    discover,
    short_list,
)
from finetune.data.manifest import Manifest, ManifestRow
from finetune.data.scan import (
    BadFile,
    ScanResult,
    bad_files,
    duplicate_groups,
    scan_images,
    write_report,
)
from finetune.data.similarity import hash_leaks, verdict_settings
from finetune.data.split import split_classes, validate_split_options
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

DEFAULT_VAL = 0.15
DEFAULT_TEST = 0.15


def prepare_manifest(
    root: str | os.PathLike | None = None,
    *,
    manifest: str | os.PathLike | None = None,
    card: str | os.PathLike | Mapping | None = None,
    val: float | None = None,
    test: float | None = None,
    train_per_class: int | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    scan: bool = True,
    report_path: str | os.PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scan_cache: bool | str | os.PathLike = True,
    report_shown_as: str | os.PathLike | None = None,
) -> tuple[Manifest, list[BadFile]]:
    """Find, split and check a dataset: the one entry point of a training run.

    The source is, in this order: ``manifest`` (a CSV written by `Manifest.write_csv`; ``root``, if
    given, is its root), ``root`` when it is a file (a manifest), or ``root`` as a dataset folder, whose
    layout is detected (see `discover`). Every image is scanned first and the bad ones are dropped. A
    pre-split folder is used as split; the usable images of a one-folder dataset are split by the seeded,
    stratified rule of `split_classes`, so split sizes count usable images only (``train_per_class=30``
    gives 30 wherever a class has more than 30 usable images) and a bad file is split as if it were absent.

    A card (name, YAML path, or an already loaded card dict) supplies defaults: its ``split`` section
    gives ``val``, ``test`` and ``train_per_class`` where the caller passes None, and its ``exclude`` list
    is always excluded, together with ``exclude``. Its ``layout`` and ``num_classes`` are checked, and a
    root that holds the card's ``folder`` (``caltech-101`` holding ``101_ObjectCategories``) is an error
    naming the folder to give instead. Without card values, ``val`` and ``test`` default to 0.15.

    The returned manifest's root is ``manifest_root(root, manifest)``: ``root`` when it is a folder, else the
    manifest's folder. A manifest written from it is read back with
    ``Manifest.read_csv(path, root=manifest_root(root, manifest))``.

    Args:
        root: Dataset folder, or a manifest CSV.
        manifest: Manifest CSV to reuse instead of splitting.
        card: Dataset card supplying defaults: a name, a YAML path, or a dict returned by `load_card`.
        val: Val fraction: of each class, or with ``train_per_class`` of what is left after training.
        test: Test fraction of each class; not allowed with ``train_per_class`` (the rest is test).
        train_per_class: Fixed number of training images per class (Caltech-101's protocol).
        exclude: Class names to leave out, in addition to the card's.
        seed: Split seed.
        scan: Decode every image and exclude the bad ones.
        report_path: Where to write the bad files as CSV ``path,reason`` (only when scanning; written even
            when there are none, so a stale report never survives).
        max_pixels: Largest width × height accepted by the scan.
        scan_cache: Reuse and record what the scan learns about unchanged files: True for the shared cache
            (`default_scan_cache`), a path for another database, False to decode every image.
        report_shown_as: The path the warning about bad files names (default ``report_path``): where the
            report will be once the caller publishes it (a run writes it into a staging folder first).

    Returns:
        The manifest of usable images (split names ``train``/``val``/``test``) and the bad files excluded.

    Raises:
        FinetuneError: No source, split options with a pre-split folder or a manifest, ``test`` with
            ``train_per_class``, a layout or class count that contradicts the card, a manifest none of whose
            images exists under its root, or no usable image.
    """
    card = load_card(card) if card is not None and not isinstance(card, Mapping) else card
    protocol = card["split"] if card else {}
    exclude = (*protocol.get("exclude", ()), *exclude)
    if manifest is None and root is not None and Path(root).is_file():
        manifest, root = root, None
    explicit = [k for k, v in (("val", val), ("test", test), ("train_per_class", train_per_class)) if v is not None]

    unsplit = None  # class -> paths of a one-folder dataset, split once the bad files are known
    if manifest is not None:
        if explicit:
            raise FinetuneError(f"{', '.join(explicit)} cannot be used with a manifest: it is already split")
        listed = Manifest.read_csv(manifest, root=manifest_root(root, manifest))
        listed = Manifest(listed.root, [r for r in listed.rows if r.label not in exclude])
        _check_class_count(card, listed.classes, f"manifest {manifest}")
        _check_listed_images_exist(listed, manifest)
        data_root, paths = listed.root, [r.path for r in listed.rows]
    elif root is None:
        raise FinetuneError("no dataset: give a dataset root or a manifest")
    else:
        found = _find(Path(root), card, exclude)
        if found.layout == PRE_SPLIT:
            if explicit:
                raise FinetuneError(f"{', '.join(explicit)} cannot be used: {found.root} is already split into folders")
            listed = Manifest.from_splits(found.root, found.images)
        else:
            if train_per_class is None:
                train_per_class = protocol.get("train_per_class")
            if train_per_class is not None and test is not None:
                raise FinetuneError(
                    f"test cannot be combined with train_per_class={train_per_class}: "
                    "the images left after training are the test set"
                )
            val, test = _first(val, protocol.get("val"), DEFAULT_VAL), _first(test, protocol.get("test"), DEFAULT_TEST)
            validate_split_options(val, test, train_per_class)
            unsplit = found.images[UNSPLIT]
        data_root = found.root
        paths = [p for per_class in found.images.values() for class_paths in per_class.values() for p in class_paths]

    # Scan before splitting: the split sizes count usable images only, so a class with a bad file still gets
    # train_per_class training images, and a bad file is split exactly as if it were absent.
    results = (_scan(data_root, paths, report_path, max_pixels, scan_cache, report_shown_as or report_path)
               if scan else [])
    bad = bad_files(results)
    dropped = {b.path for b in bad}
    if unsplit is not None:
        usable = {c: [p for p in ps if p not in dropped] for c, ps in unsplit.items()}
        usable = {c: ps for c, ps in usable.items() if ps}
        split = split_classes(usable, val=val, test=test, train_per_class=train_per_class, seed=seed)
        result, classes = Manifest.from_splits(data_root, split), list(unsplit)
    else:
        result, classes = listed.without(dropped), listed.classes
    emptied = sorted(set(classes) - set(result.classes))
    if emptied:
        logger.warning("dropping class(es) with no usable image: %s", short_list(map(repr, emptied)))
    _warn_leaks(result, results, _audit_arguments(manifest, data_root), _cache_path(scan_cache))
    if not result.rows:
        raise FinetuneError(f"no usable image in {manifest or root}")
    counts = ", ".join(f"{s} {sum(c.values())}" for s, c in result.counts().items())
    logger.info("%s: %d classes; %s", manifest or result.root, len(result.classes), counts)
    return result, bad


def manifest_root(root: str | os.PathLike | None, manifest: str | os.PathLike | None) -> Path | None:
    """The folder a dataset's manifest paths are relative to, from the ``data.root`` and ``data.manifest`` of a
    recipe: ``root`` when it is a folder, else the manifest's own folder (``root`` may itself be the manifest).

    A run reads its copy of the manifest (``RUN_DIR/manifest.csv``) against this root, on resume too, so the
    copy resolves to the same images as the original.

    Raises:
        FinetuneError: ``root`` is a file while a manifest is given too.
    """
    if root is not None and Path(root).is_file():
        if manifest is not None:
            raise FinetuneError(f"data root {root} is a file: with a manifest, give the dataset folder as the root")
        return Path(root).parent
    if root is not None:
        return Path(root)
    return Path(manifest).parent if manifest is not None else None


def _check_listed_images_exist(manifest: Manifest, source: str | os.PathLike) -> None:
    """A manifest none of whose images exists under its root was given the wrong root: say so."""
    if not any((manifest.root / r.path).exists() for r in manifest.rows):
        raise FinetuneError(
            f"none of the {len(manifest.rows)} images listed in {source} exists under {manifest.root}: manifest "
            "paths are relative to the dataset root; keep the manifest in that folder, or give the folder as the "
            "data root (data.root, --set data.root=ROOT)"
        )


def _find(root: Path, card: Mapping | None, exclude: tuple[str, ...]) -> DatasetFolder:
    """Discover a dataset folder, checking it against the card's folder, layout and class count."""
    if card and card["folder"] and (root / card["folder"]).is_dir():
        raise FinetuneError(f"card {card['name']!r}: the class folders are in {root / card['folder']}; give that as the root")
    found = discover(root)
    if card and found.layout != card["layout"]:
        raise FinetuneError(
            f"card {card['name']!r} expects a {card['layout']} dataset, but {root} is {found.layout} "
            f"({', '.join(d + '/' for d in found.split_dirs.values()) or 'class folders only'})"
        )
    if exclude:
        found = found.without(exclude)
    _check_class_count(card, found.classes, str(root))
    return found


def _check_class_count(card: Mapping | None, classes: list[str], source: str) -> None:
    if card and len(classes) != card["num_classes"]:
        raise FinetuneError(
            f"card {card['name']!r} expects {card['num_classes']} classes, found {len(classes)} in {source} "
            "(another version of the dataset, or the wrong folder? leave out the card to use it as it is)"
        )


def _scan(root: Path, paths: list[str], report_path: str | os.PathLike | None, max_pixels: int,
          scan_cache: bool | str | os.PathLike, shown_as: str | os.PathLike | None) -> list[ScanResult]:
    """Scan the images, write the bad-file report and warn about the bad files (naming the report as ``shown_as``)."""
    results = scan_images(root, paths, max_pixels=max_pixels, cache=_cache_path(scan_cache))
    bad = bad_files(results)
    if report_path is not None:
        write_report(report_path, bad)
    if bad:
        where = f"; listed in {shown_as}" if shown_as is not None else ""
        logger.warning("excluded %d unusable image(s)%s, e.g. %s: %s", len(bad), where, bad[0].path, bad[0].reason)
    return results


def _cache_path(scan_cache: bool | str | os.PathLike) -> Path | None:
    """The scan cache database a ``scan_cache`` argument names: True the shared one, False none."""
    if scan_cache is True:
        return default_scan_cache()
    return Path(scan_cache) if scan_cache is not False else None


def _audit_arguments(manifest: str | os.PathLike | None, data_root: Path) -> str:
    """What ``finetune data audit`` takes to audit this split: the manifest when training used one (with
    ``--root`` when its paths are relative to another folder, as in a run's copy), else the dataset root."""
    if manifest is None:
        return str(data_root)
    if Path(manifest).resolve().parent == data_root.resolve():
        return str(manifest)
    return f"{manifest} --root {data_root}"


def leaks(manifest: Manifest, groups: list[list[str]]) -> list[list[str]]:
    """The duplicate groups whose files sit in more than one split of ``manifest``: leakage."""
    split_of = {r.path: r.split for r in manifest.rows}
    return [g for g in groups if len({split_of[p] for p in g if p in split_of}) > 1]


def _warn_leaks(manifest: Manifest, results: list[ScanResult], audit_arguments: str,
                cache: Path | None = None) -> None:
    """Warn about byte-identical images that sit in more than one split, and about resized or re-encoded
    copies (same perceptual hash, confirmed by thumbnail correlation; see `hash_leaks`), pointing at
    ``finetune data audit AUDIT_ARGUMENTS``."""
    leaked = leaks(manifest, duplicate_groups(results))
    if leaked:
        logger.warning(
            "%d group(s) of byte-identical images sit in more than one split (leakage), e.g. %s",
            len(leaked),
            " = ".join(leaked[0]),
        )
    split_of = {r.path: r.split for r in manifest.rows}
    scanned = [r for r in results if r.reason is None and r.path in split_of]
    identical = {p for group in leaked for p in group}
    verdicts = PairVerdicts(cache, verdict_settings()) if cache is not None else None
    try:
        near = [g for g in hash_leaks([r.path for r in scanned], [split_of[r.path] for r in scanned],
                                      [r.phash for r in scanned], lambda p: load_image(manifest.root / p),
                                      digests=[r.sha256 for r in scanned], verdicts=verdicts)
                if not set(g) <= identical]
    finally:
        if verdicts is not None:
            verdicts.close()
    if near:
        logger.warning(
            "%d group(s) of near-identical images (resized or re-encoded copies) sit in more than one split "
            "(leakage), e.g. %s; run `finetune data audit %s` for near-duplicates, label issues and outliers",
            len(near), " ~ ".join(near[0]), audit_arguments,
        )


def _first(*values):
    return next(v for v in values if v is not None)


def inspect_dataset(root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    scan_cache: bool | str | os.PathLike = True) -> dict:
    """Scan a dataset folder or manifest and describe it (keys in the module docstring).

    Args:
        root: A dataset folder or a manifest CSV (whose root is its folder).
        max_pixels: Largest width × height accepted.
        scan_cache: As in `prepare_manifest`: True for the shared scan cache, a path, or False.

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
    results = scan_images(root, [r.path for r in rows], max_pixels=max_pixels, cache=_cache_path(scan_cache))
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


def split_options(options: Mapping) -> dict:
    """The `prepare_manifest` arguments of a recipe's ``data`` section (a dict, as a run saves it): what
    decides which image lands in which split. The one reading of those keys, for a run and for every
    command that splits data the way a run did (`split_like_run`)."""
    return {"card": options.get("card"), "val": options.get("val"), "test": options.get("test"),
            "train_per_class": options.get("train_per_class"), "exclude": tuple(options.get("exclude") or ()),
            "seed": options.get("seed", 0)}


def split_like_run(data: str | os.PathLike, recipe_data: Mapping, run_manifest: str | os.PathLike | None = None
                   ) -> Manifest:
    """The manifest of ``data`` split as a checkpoint's training run split it.

    In order: a manifest file as it is (no scan); the run's own ``manifest.csv`` when all its files are
    under ``data``; the recipe's ``data.manifest`` when it is there; else ``data`` split with the recipe's
    split options (`split_options`), scanned, since training split the usable images only.

    Args:
        data: An image folder or a manifest CSV.
        recipe_data: The run's recipe ``data`` section (``{}`` when unknown).
        run_manifest: The run's ``manifest.csv``, if the checkpoint sits in a run folder.

    Raises:
        FinetuneError: ``data`` does not exist, and `prepare_manifest`'s errors.
    """
    root = Path(data)
    if not root.exists():
        raise FinetuneError(f"no such data folder or manifest: {root}")
    if root.is_file():
        return prepare_manifest(root, scan=False)[0]
    if run_manifest is not None and Path(run_manifest).is_file():
        manifest = Manifest.read_csv(run_manifest, root=root)
        if all((root / r.path).exists() for r in manifest.rows):
            return manifest
    recipe_manifest = recipe_data.get("manifest")
    if recipe_manifest and Path(recipe_manifest).is_file():
        return prepare_manifest(root, manifest=recipe_manifest)[0]
    return prepare_manifest(root, **split_options(recipe_data))[0]
