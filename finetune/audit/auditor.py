"""`audit_dataset`: a dataset found, scanned and split as training would (`prepare_manifest`), embedded once
through the feature cache (`embed_manifest`), then audited on the features (`audit_features`, the
algorithms of `finetune.audit.findings`) into an `Audit`."""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune._device import resolve_device
from finetune.audit.findings import (DUPLICATE_COSINE, FOLDS, OUTLIER_MADS, confident_learning, find_near_duplicates,
                                     multilabel_label_issues, out_of_fold_log_probabilities, outlier_distances)
from finetune.data._scan_cache import default_scan_cache
from finetune.data.decode import load_image
from finetune.data.manifest import Manifest, ManifestRow
from finetune.data.multilabel import LabelsTable, is_labels_csv, read_labels_csv, split_labels
from finetune.data.prepare import DEFAULT_TEST, DEFAULT_VAL, prepare_manifest
from finetune.data.scan import scan_images
from finetune.data.similarity import COPY_SIMILARITY, colour_name
from finetune.data.transforms import preprocessing_transform
from finetune.errors import FinetuneError
from finetune.features.cache import cached_features
from finetune.models.factory import create_model, resolve_preprocessing

logger = logging.getLogger("finetune.audit")

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_PRETRAINED = "offline"


@dataclass
class Audit:
    """What `audit_dataset` found.

    Attributes:
        manifest: The audited images with their classes and splits.
        near_duplicates: Groups, leaking ones first: ``{"group", "paths", "splits", "classes", "leak",
            "similarity"}`` (``similarity``: least confirmed thumbnail correlation in the group).
        label_issues: Likely label errors, most likely first: ``{"path", "split", "given", "suggested",
            "score", "p_given", "p_suggested"}``.
        outliers: The images farthest from every class, farthest first: ``{"path", "split", "class",
            "distance", "nearest_class", "flagged"}`` (at least 20, or 1 % of the images).
        blank_images: Blank or single-colour images, listed on their own (any two look alike to every
            similarity): ``{"path", "split", "class", "colour"}`` (``#rrggbb``), in manifest order.
        settings: Backbone, input size, thresholds, folds.
        seconds: Time taken by each step (``features``, ``duplicates``, ``labels``, ``outliers``).
        features_cached: Whether the features came from the cache.
        labels: Multi-label data's labels table (then each manifest row's "class" is its label set, joined by
            ``"; "``, label issues are per label with ``label`` and ``kind``, and outliers are not computed).
    """

    manifest: Manifest
    near_duplicates: list[dict[str, Any]]
    label_issues: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    blank_images: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    features_cached: bool = False
    labels: LabelsTable | None = None

    def summary(self) -> dict[str, Any]:
        """Counts for the one-paragraph summary and ``--json``."""
        leaking = [g for g in self.near_duplicates if g["leak"]]
        leaked = sum(1 for g in leaking for p, s in zip(g["paths"], g["splits"]) if s != "train" and "train" in g["splits"])
        return {
            "images": len(self.manifest),
            "classes": len(self.labels.classes if self.labels is not None else self.manifest.classes),
            "splits": {s: sum(c.values()) for s, c in self.manifest.counts().items()},
            "near_duplicate_groups": len(self.near_duplicates),
            "near_duplicate_images": sum(len(g["paths"]) for g in self.near_duplicates),
            "leaking_groups": len(leaking),
            "leaked_images": leaked,
            "blank_images": len(self.blank_images),
            "label_issues": len(self.label_issues),
            "outliers_flagged": sum(o["flagged"] for o in self.outliers),
        }


# -------------------------------------------------------------------------------------------- features

def embed_manifest(
    manifest: Manifest,
    *,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: bool | str = DEFAULT_PRETRAINED,
    input_size: int | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, bool, dict[str, Any]]:
    """Pooled backbone features of every manifest row (eval transform of the whole image), cached.

    Returns:
        ``(features, cached, settings)``: ``len(manifest)×F`` float32 in row order, whether they came
        from the feature cache, and the settings used (backbone, pretrained, input size).
    """
    with torch.random.fork_rng(devices=[]):  # a random-init backbone (tests) is the same every time: cacheable
        torch.manual_seed(0)
        model = create_model(backbone, 1, head="linear", pretrained=pretrained)
    config = model.data_config()
    # the whole image (crop_pct 1), as the backbone's own preprocessing resizes it
    preprocessing = resolve_preprocessing(config, input_size=input_size, crop_pct=1.0)
    size = preprocessing["input_size"]
    transform = preprocessing_transform(preprocessing, device_normalize=True)
    device = resolve_device(device)
    items = [(manifest.root / r.path, 0) for r in manifest.rows]
    settings = {"audit": True, "backbone": backbone, "pretrained": str(pretrained), "input_size": size,
                "mean": list(config["mean"]), "std": list(config["std"])}
    features, cached = cached_features(model.backbone.to(device), items, transform, settings=settings,
                                       cache_dir=cache_dir, device=device, batch_size=batch_size,
                                       num_workers=num_workers)
    return features, cached, {"backbone": backbone, "pretrained": str(pretrained), "input_size": size[1:]}


def audit_features(
    manifest: Manifest,
    features: np.ndarray,
    *,
    duplicate_cosine: float = DUPLICATE_COSINE,
    copy_similarity: float = COPY_SIMILARITY,
    folds: int = FOLDS,
    seed: int = 0,
    load: Callable[[int], np.ndarray] | None = None,
    multilabel: LabelsTable | None = None,
) -> Audit:
    """Audit ``manifest`` given its rows' features (see the module docstring).

    Args:
        manifest: The images.
        features: One row per manifest row.
        duplicate_cosine: Least embedding cosine of a near-duplicate candidate.
        copy_similarity: Least thumbnail correlation of a confirmed near-duplicate.
        folds: Folds of the out-of-fold classifier.
        seed: Fold seed.
        load: Row index → RGB array (default: `load_image` of the row's file).
        multilabel: multi-label data's table, whose images the manifest's rows are (by path): label issues per label
            (`multilabel_label_issues`), no outliers (class centroids are of single-label classes).
    """
    rows, classes = manifest.rows, manifest.classes
    if len(features) != len(rows):
        raise FinetuneError(f"{len(features)} feature rows for {len(rows)} images")
    load = load or (lambda i: load_image(manifest.root / rows[i].path))
    labels = np.array([classes.index(r.label) for r in rows], dtype=np.int64)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    groups = []
    flat: dict[int, tuple] = {}
    for number, (members, similarity) in enumerate(
        find_near_duplicates(features, load, duplicate_cosine=duplicate_cosine, copy_similarity=copy_similarity,
                             flat=flat)
    ):
        splits = [rows[i].split for i in members]
        groups.append({"group": number, "paths": [rows[i].path for i in members], "splits": splits,
                       "classes": [rows[i].label for i in members], "leak": len(set(splits)) > 1,
                       "similarity": round(similarity, 5)})
    groups.sort(key=lambda g: (not g["leak"], g["group"]))
    blank = [{"path": rows[i].path, "split": rows[i].split, "class": rows[i].label, "colour": colour_name(flat[i])}
             for i in sorted(flat)]
    seconds["duplicates"] = time.perf_counter() - start

    if multilabel is not None:
        return _multilabel_audit(manifest, features, multilabel, groups, blank, seconds, folds=folds, seed=seed,
                                 settings={"duplicate_cosine": duplicate_cosine, "copy_similarity": copy_similarity,
                                           "folds": folds, "seed": seed})
    start = time.perf_counter()
    issues = []
    try:
        log_probabilities = out_of_fold_log_probabilities(features, labels, len(classes), folds=folds, seed=seed)
    except FinetuneError as e:
        logger.warning("no label issues: %s", e)
    else:
        probabilities = np.exp(log_probabilities)
        is_issue, suggested = confident_learning(labels, probabilities)
        for i in np.flatnonzero(is_issue):
            issues.append({"path": rows[i].path, "split": rows[i].split, "given": rows[i].label,
                           "suggested": classes[suggested[i]], "score": round(-float(log_probabilities[i, labels[i]]), 5),
                           "p_given": round(float(probabilities[i, labels[i]]), 5),
                           "p_suggested": round(float(probabilities[i, suggested[i]]), 5)})
        issues.sort(key=lambda r: (-r["score"], r["path"]))
    seconds["labels"] = time.perf_counter() - start

    start = time.perf_counter()
    distance, nearest = outlier_distances(features, labels, len(classes))
    median = float(np.median(distance))
    cutoff = median + OUTLIER_MADS * float(np.median(np.abs(distance - median)))
    top = max(20, math.ceil(len(rows) / 100))
    outliers = [{"path": rows[i].path, "split": rows[i].split, "class": rows[i].label,
                 "distance": round(float(distance[i]), 5), "nearest_class": classes[nearest[i]],
                 "flagged": bool(distance[i] > cutoff)}
                for i in np.argsort(-distance, kind="stable")[:top]]
    seconds["outliers"] = time.perf_counter() - start
    settings = {"duplicate_cosine": duplicate_cosine, "copy_similarity": copy_similarity, "folds": folds,
                "seed": seed, "outlier_cutoff": round(cutoff, 5)}
    return Audit(manifest, groups, issues, outliers, blank_images=blank, settings=settings, seconds=seconds)


def _multilabel_audit(manifest: Manifest, features: np.ndarray, labels: LabelsTable, groups: list, blank: list,
                      seconds: dict[str, float], *, folds: int, seed: int, settings: dict[str, Any]) -> Audit:
    """The label checks of multi-label data: per-label confident learning; outliers are not computed."""
    start = time.perf_counter()
    sets = dict(zip(labels.paths, labels.labels))
    index = {c: i for i, c in enumerate(labels.classes)}
    targets = np.zeros((len(manifest.rows), len(labels.classes)), np.int64)
    for row, r in enumerate(manifest.rows):
        targets[row, [index[c] for c in sets[r.path]]] = 1
    issues = []
    for i, c, kind, score, p_given, p_suggested in multilabel_label_issues(features, targets, folds=folds, seed=seed):
        r, label = manifest.rows[i], labels.classes[c]
        given = list(sets[r.path])
        suggested = [x for x in given if x != label] if kind == "extra" else sorted([*given, label])
        issues.append({"path": r.path, "split": r.split, "given": "; ".join(given) or NO_LABELS,
                       "suggested": "; ".join(suggested) or NO_LABELS, "score": round(score, 5),
                       "p_given": round(p_given, 5), "p_suggested": round(p_suggested, 5), "label": label, "kind": kind})
    issues.sort(key=lambda r: (-r["score"], r["path"], r["label"]))
    seconds["labels"] = time.perf_counter() - start
    settings = {"task": "multilabel", **settings,
                "outliers": "not computed for multi-label data (class centroids are of single-label classes)"}
    return Audit(manifest, groups, issues, [], blank_images=blank, settings=settings, seconds=seconds, labels=labels)


NO_LABELS = "(no label)"
"""The label set shown for an image with none."""


def multilabel_manifest(source: str | os.PathLike, root: str | os.PathLike | None = None, *, val: float | None = None,
                        test: float | None = None, seed: int = 0) -> tuple[Manifest, LabelsTable]:
    """A labels CSV read, split as training splits it (its split column, else seeded iterative stratification) and
    scanned (bad files left out, with a warning), as a `Manifest` whose "class" is each image's label set, and the
    table of the images kept.

    Raises:
        FinetuneError: `read_labels_csv`'s errors; no readable image.
    """
    table = read_labels_csv(source, root=root)
    if not table.splits():
        table = split_labels(table, val=DEFAULT_VAL if val is None else val, test=DEFAULT_TEST if test is None else test,
                             seed=seed)
    results = scan_images(table.root, table.paths, cache=default_scan_cache())
    bad = [r for r in results if r.reason is not None]
    if bad:
        logger.warning("left out %d unreadable image(s), e.g. %s: %s", len(bad), bad[0].path, bad[0].reason)
    keep = [i for i, r in enumerate(results) if r.reason is None]
    if not keep:
        raise FinetuneError(f"{source}: none of its {len(table.paths)} images could be read")
    table = LabelsTable(table.root, [table.paths[i] for i in keep], [table.labels[i] for i in keep],
                        [table.splits_list[i] for i in keep])
    manifest = Manifest(table.root, [ManifestRow(p, "; ".join(ls) or NO_LABELS, s)
                                     for p, ls, s in zip(table.paths, table.labels, table.splits_list)])
    return manifest, table


def audit_dataset(
    source: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: bool | str = DEFAULT_PRETRAINED,
    input_size: int | None = None,
    card: str | None = None,
    val: float | None = None,
    test: float | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    duplicate_cosine: float = DUPLICATE_COSINE,
    copy_similarity: float = COPY_SIMILARITY,
    folds: int = FOLDS,
) -> Audit:
    """Audit a dataset folder (pre-split or one folder, split as training would split it) or manifest.

    The images are found, scanned and split by `prepare_manifest` (bad files are left out), embedded by
    `embed_manifest` and audited by `audit_features`. ``root`` is the folder a manifest's paths are
    relative to (default: the manifest's folder).

    Raises:
        FinetuneError: ``root`` with a ``source`` that is not a manifest file, and `prepare_manifest`'s errors.
    """
    if root is not None and not Path(source).is_file():
        raise FinetuneError(f"a root (--root) is only for a manifest, and {source} is not a manifest file")
    table = None
    if is_labels_csv(source):  # multi-label: a labels CSV
        manifest, table = multilabel_manifest(source, root, val=val, test=test, seed=seed)
    else:
        manifest, _ = prepare_manifest(root if root is not None else source,
                                       manifest=source if root is not None else None, card=card, val=val, test=test,
                                       seed=seed)
    start = time.perf_counter()
    features, cached, embedding = embed_manifest(
        manifest, backbone=backbone, pretrained=pretrained, input_size=input_size, device=device,
        batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
    )
    took = time.perf_counter() - start
    audit = audit_features(manifest, features, duplicate_cosine=duplicate_cosine, copy_similarity=copy_similarity,
                           folds=folds, seed=seed, multilabel=table)
    audit.settings = {**embedding, **audit.settings}
    audit.seconds = {"features": took, **audit.seconds}
    audit.features_cached = cached
    return audit
