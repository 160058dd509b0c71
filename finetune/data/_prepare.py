"""`prepare_manifest`: from a dataset root, a manifest or a card to the manifest of usable images."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from finetune.data._cards import load_card
from finetune.data._decode import DEFAULT_MAX_PIXELS
from finetune.data._layout import PRE_SPLIT, UNSPLIT, DatasetFolder, discover, short_list
from finetune.data._manifest import Manifest
from finetune.data._scan import BadFile, bad_files, duplicate_groups, leaks, scan_images, write_report
from finetune.data._split import split_classes
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
) -> tuple[Manifest, list[BadFile]]:
    """Find, split and check a dataset: the one entry point of a training run.

    The source is, in this order: ``manifest`` (a CSV written by `Manifest.write_csv`; ``root``, if
    given, is its root), ``root`` when it is a file (a manifest), or ``root`` as a dataset folder, whose
    layout is detected (see `discover`). A pre-split folder is used as split; a one-folder dataset is
    split by the seeded, stratified rule of `split_classes`, before the scan, so the assignment does not
    depend on which files turn out bad.

    A card (name, YAML path, or an already loaded card dict) supplies defaults: its ``split`` section
    gives ``val``, ``test`` and ``train_per_class`` where the caller passes None, and its ``exclude`` list
    is always excluded, together with ``exclude``. Its ``layout`` and ``num_classes`` are checked, and a
    root that holds the card's ``folder`` (``caltech-101`` holding ``101_ObjectCategories``) is an error
    naming the folder to give instead. Without card values, ``val`` and ``test`` default to 0.15.

    The returned manifest's root is always ``root`` as given (or the manifest's folder), so a manifest
    written from it can be read back with ``Manifest.read_csv(path, root=root)``.

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

    Returns:
        The manifest of usable images (split names ``train``/``val``/``test``) and the bad files excluded.

    Raises:
        FinetuneError: No source, split options with a pre-split folder or a manifest, ``test`` with
            ``train_per_class``, a layout or class count that contradicts the card, or no usable image.
    """
    card = load_card(card) if card is not None and not isinstance(card, Mapping) else card
    protocol = card["split"] if card else {}
    exclude = (*protocol.get("exclude", ()), *exclude)
    if manifest is None and root is not None and Path(root).is_file():
        manifest, root = root, None
    explicit = [k for k, v in (("val", val), ("test", test), ("train_per_class", train_per_class)) if v is not None]

    if manifest is not None:
        if explicit:
            raise FinetuneError(f"{', '.join(explicit)} cannot be used with a manifest: it is already split")
        result = Manifest.read_csv(manifest, root=root)
        result = Manifest(result.root, [r for r in result.rows if r.label not in exclude])
        _check_class_count(card, result.classes, f"manifest {manifest}")
    elif root is None:
        raise FinetuneError("no dataset: give a dataset root or a manifest")
    else:
        found = _find(Path(root), card, exclude)
        if found.layout == PRE_SPLIT:
            if explicit:
                raise FinetuneError(f"{', '.join(explicit)} cannot be used: {found.root} is already split into folders")
            splits = found.images
        else:
            if train_per_class is None:
                train_per_class = protocol.get("train_per_class")
            if train_per_class is not None and test is not None:
                raise FinetuneError(
                    f"test cannot be combined with train_per_class={train_per_class}: "
                    "the images left after training are the test set"
                )
            splits = split_classes(
                found.images[UNSPLIT],
                val=_first(val, protocol.get("val"), DEFAULT_VAL),
                test=_first(test, protocol.get("test"), DEFAULT_TEST),
                train_per_class=train_per_class,
                seed=seed,
            )
        result = Manifest.from_splits(found.root, splits)

    bad: list[BadFile] = []
    if scan:
        result, bad = _exclude_bad(result, report_path, max_pixels)
    if not result.rows:
        raise FinetuneError(f"no usable image in {manifest or root}")
    counts = ", ".join(f"{s} {sum(c.values())}" for s, c in result.counts().items())
    logger.info("%s: %d classes; %s", manifest or result.root, len(result.classes), counts)
    return result, bad


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


def _exclude_bad(
    manifest: Manifest, report_path: str | os.PathLike | None, max_pixels: int
) -> tuple[Manifest, list[BadFile]]:
    """Scan the manifest's images, drop the bad ones, write the report, and warn about leakage."""
    results = scan_images(manifest.root, [r.path for r in manifest.rows], max_pixels=max_pixels)
    bad = bad_files(results)
    good = manifest.without({b.path for b in bad})
    if report_path is not None:
        write_report(report_path, bad)
    if bad:
        where = f"; listed in {report_path}" if report_path is not None else ""
        logger.warning("excluded %d unusable image(s)%s, e.g. %s: %s", len(bad), where, bad[0].path, bad[0].reason)
    emptied = sorted(set(manifest.classes) - set(good.classes))
    if emptied:
        logger.warning("dropping class(es) with no usable image: %s", short_list(map(repr, emptied)))
    leaked = leaks(good, duplicate_groups(results))
    if leaked:
        logger.warning(
            "%d group(s) of byte-identical images sit in more than one split (leakage), e.g. %s",
            len(leaked),
            " = ".join(leaked[0]),
        )
    return good, bad


def _first(*values):
    return next(v for v in values if v is not None)
