"""`audit_dataset`: near-duplicates and leakage, likely label errors and outliers, from backbone features.

A top-level module like `finetune.inference` and `finetune.export`: it composes the data layer (manifest,
pixel similarity), a model, the training feature cache and the evaluation report's HTML helpers.

The audit embeds every usable image once with a pretrained backbone (pooled features of the whole
image: eval transform with ``crop_pct=1``), through the training feature cache, so a second audit of the
same data and backbone skips the forward pass. Then, all on the features:

* **Near-duplicates** (`find_near_duplicates`): each image's ``neighbours`` nearest images by cosine
  similarity of the L2-normalised features are candidates when the cosine is at least
  ``duplicate_cosine`` (default `DUPLICATE_COSINE`), and so are its ``neighbours`` nearest images by
  correlation of the whole 24×24 greyscale thumbnails (`thumbnail_vector`) when it is at least
  ``thumbnail_cosine`` (default `THUMBNAIL_COSINE`); a candidate pair is **confirmed** when its crop-aware
  thumbnail correlation (`view_similarity`) is at least ``copy_similarity`` (default `COPY_SIMILARITY`).
  Embeddings alone cannot tell a copy from a look-alike (two writers' ``1`` at 8×8 embed at cosine 0.99),
  and a small crop can move an embedding far (a 2-pixel crop of a 32 px digit: cosine 0.75) while its
  thumbnail stays its nearest; pixels cannot be compared all-pairs: the two neighbour searches find, the
  crop-aware pixels decide. Confirmed pairs are joined into groups; a group whose images sit in more than one split is
  **leakage** (a val/test image with a near-copy in train).
* **Label issues** (`out_of_fold_log_probabilities`, `confident_learning`): k-fold (stratified, seeded)
  out-of-fold class probabilities from a linear classifier on the features (L2-normalised, PCA to at
  most 128 dimensions, shrinkage LDA), so no image is scored by a model that saw it; then confident
  learning (Northcutt et al., JAIR 2021): per-class thresholds ``t_j`` = mean probability of class ``j``
  over the images labelled ``j``; an image is counted as truly of class ``j*``, the most probable of the
  classes whose probability reaches their threshold; an image labelled ``i ≠ j*`` is a label issue
  (an off-diagonal entry of the confident joint). Issues are ranked by ``score = -log p(given label)``
  (self-confidence in log space, from the classifier's decision function), highest first: unlike
  ``1 - p``, it does not tie at 1 when the probabilities saturate to 0/1; ``suggested`` is ``j*``.
* **Outliers** (`outlier_distances`): cosine distance of each image to the nearest class centroid (mean
  of the class's normalised features), highest first; ``flagged`` when above the median plus 6 median
  absolute deviations of all distances.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune._io import write_dir_atomic
from finetune.data import (
    COPY_SIMILARITY,
    FLAT_LEVELS,
    Manifest,
    load_image,
    prepare_manifest,
    colour_name,
    flat_copies,
    flat_signature,
    thumbnail_vector,
    thumbnail_views,
    view_similarity,
)
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_PRETRAINED = "offline"
DUPLICATE_COSINE = 0.85
"""Least embedding cosine similarity of a near-duplicate candidate pair (confirmed by pixels)."""
THUMBNAIL_COSINE = 0.7
"""Least whole-thumbnail correlation of a near-duplicate candidate pair found by thumbnails (confirmed by
the crop-aware `view_similarity`; copies cropped by 6 % per side correlate about 0.93 whole)."""
NEIGHBOURS = 10
"""Nearest images per image considered as near-duplicate candidates, in each of the two searches."""
FOLDS = 5
PCA_DIMS = 128
MISSING_LOG_PROBABILITY = float(np.log(np.finfo(np.float64).tiny))
"""Out-of-fold log-probability of a class the fold's model never saw (about -708: the least normal float)."""
OUTLIER_MADS = 6.0
FILES = ("near_duplicates.csv", "blank_images.csv", "label_issues.csv", "outliers.csv", "audit.html")


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
    """

    manifest: Manifest
    near_duplicates: list[dict[str, Any]]
    label_issues: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    blank_images: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    features_cached: bool = False

    def summary(self) -> dict[str, Any]:
        """Counts for the one-paragraph summary and ``--json``."""
        leaking = [g for g in self.near_duplicates if g["leak"]]
        leaked = sum(1 for g in leaking for p, s in zip(g["paths"], g["splits"]) if s != "train" and "train" in g["splits"])
        return {
            "images": len(self.manifest),
            "classes": len(self.manifest.classes),
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
    import torch

    from finetune.data import build_transform
    from finetune._device import resolve_device
    from finetune.models import create_model
    from finetune.training.feature_cache import cached_features

    with torch.random.fork_rng(devices=[]):  # a random-init backbone (tests) is the same every time: cacheable
        torch.manual_seed(0)
        model = create_model(backbone, 1, head="linear", pretrained=pretrained)
    config = model.data_config()
    size = [3, input_size, input_size] if input_size else list(config["input_size"])
    transform = build_transform(False, input_size=size, mean=config["mean"], std=config["std"],
                                interpolation=config.get("interpolation", "bicubic"), crop_pct=1.0)
    device = resolve_device(device)
    items = [(manifest.root / r.path, 0) for r in manifest.rows]
    settings = {"audit": True, "backbone": backbone, "pretrained": str(pretrained), "input_size": size,
                "mean": list(config["mean"]), "std": list(config["std"])}
    features, cached = cached_features(model.backbone.to(device), items, transform, settings=settings,
                                       cache_dir=cache_dir, device=device, batch_size=batch_size,
                                       num_workers=num_workers)
    return features, cached, {"backbone": backbone, "pretrained": str(pretrained), "input_size": size[1:]}


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------------------------- near-duplicates

def nearest_neighbours(features: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most cosine-similar other rows: ``(indices, similarities)``, both ``N×k``."""
    import torch

    x = torch.from_numpy(normalize(features))
    k = min(k, len(x) - 1)
    indices, sims = [], []
    for start in range(0, len(x), chunk):
        s = x[start:start + chunk] @ x.T
        s[torch.arange(len(s)), torch.arange(start, start + len(s))] = -2.0  # not its own neighbour
        top = torch.topk(s, k, dim=1)
        indices.append(top.indices.numpy())
        sims.append(top.values.numpy())
    return np.concatenate(indices), np.concatenate(sims)


def find_near_duplicates(
    features: np.ndarray,
    load: Callable[[int], np.ndarray],
    *,
    duplicate_cosine: float = DUPLICATE_COSINE,
    thumbnail_cosine: float = THUMBNAIL_COSINE,
    copy_similarity: float = COPY_SIMILARITY,
    neighbours: int = NEIGHBOURS,
    flat: dict[int, tuple] | None = None,
) -> list[tuple[list[int], float]]:
    """Groups of near-duplicate images (module docstring): embedding and thumbnail neighbours, confirmed by
    crop-aware thumbnails.

    Args:
        features: ``N×F`` features.
        load: Image index → RGB array (every image is loaded once for its thumbnail, candidates again).
        duplicate_cosine: Least embedding cosine similarity of a candidate pair.
        thumbnail_cosine: Least whole-thumbnail correlation of a candidate pair.
        copy_similarity: Least `view_similarity` of a confirmed pair.
        neighbours: Nearest images per image considered in each search.
        flat: Filled with index → `flat_signature` of each blank or single-colour image (when given). Such
            images are copies of each other only when their signatures agree (`flat_copies`): any two look
            alike to embeddings and thumbnails.

    Returns:
        ``(indices, least confirmed similarity)`` per group, indices sorted, groups sorted by first index.
    """
    flat = flat if flat is not None else {}
    if len(features) < 2:
        return []
    thumbnails = []
    for i in range(len(features)):
        image = load(i)
        thumbnails.append(thumbnail_vector(image))
        signature = flat_signature(image)
        if signature is not None:
            flat[i] = signature
    thumbnails = np.stack(thumbnails)
    pairs = _candidates(features, duplicate_cosine, neighbours) | _candidates(thumbnails, thumbnail_cosine, neighbours)
    pairs |= _flat_pairs(flat)  # thumbnails cannot find blank copies (no contrast): their signatures do
    views: dict[int, np.ndarray] = {}

    def view(i: int) -> np.ndarray:
        if i not in views:
            views[i] = thumbnail_views(load(i))
        return views[i]

    parent = list(range(len(features)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    least: dict[tuple[int, int], float] = {}
    for i, j in sorted(pairs):
        if i in flat or j in flat:  # a blank image is a copy of another blank one of its size and colour only
            similarity = 1.0 if flat_copies(flat.get(i), flat.get(j)) else 0.0
        else:
            similarity = view_similarity(view(i), view(j))
        if similarity >= copy_similarity:
            parent[find(i)] = find(j)
            least[(i, j)] = similarity
    groups: dict[int, list[int]] = {}
    for i, j in least:
        for k in (i, j):
            groups.setdefault(find(k), [])
    for k in {k for pair in least for k in pair}:
        groups[find(k)].append(k)
    result = []
    for members in groups.values():
        members = sorted(members)
        worst = min(s for (i, j), s in least.items() if find(i) == find(members[0]))
        result.append((members, worst))
    return sorted(result)


def _flat_pairs(flat: dict[int, tuple]) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of blank images whose signatures agree (`flat_copies`): bucketed by size
    and colour, the buckets next to each other compared, so thousands of blank images cost no n² search."""
    buckets: dict[tuple, list[int]] = {}
    for i, signature in flat.items():
        buckets.setdefault(signature, []).append(i)
    keys = sorted(buckets)
    pairs = set()
    for a, key in enumerate(keys):
        for other in keys[a:]:
            if other[:2] != key[:2] or other[2] - key[2] > FLAT_LEVELS:
                break
            if flat_copies(key, other):
                pairs |= {(min(i, j), max(i, j)) for i in buckets[key] for j in buckets[other] if i != j}
    return pairs


def _candidates(vectors: np.ndarray, least: float, k: int) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, where one is among the other's ``k`` most cosine-similar rows at ``least`` or more."""
    idx, sims = nearest_neighbours(vectors, k)
    return {(min(i, j), max(i, j)) for i, row in enumerate(idx) for j, s in zip(row, sims[i]) if s >= least}


# ---------------------------------------------------------------------------------------- label issues

def out_of_fold_log_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                                  folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """``N×num_classes`` class log-probabilities, each row from a model trained on the other folds.

    The model: L2-normalised features, PCA to at most `PCA_DIMS` dimensions, shrinkage LDA (fast and
    well calibrated on frozen features). The log-probabilities are the log-softmax of its decision
    function, so they keep ordering images where the probabilities round to exactly 0 or 1. Folds are
    stratified and seeded; a class missing from a fold's training part (a class of one image) gets
    `MISSING_LOG_PROBABILITY` there.

    Raises:
        FinetuneError: Fewer than two classes, or fewer than two images in the largest class.
    """
    from scipy.special import log_softmax
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if (counts > 0).sum() < 2 or counts.max() < 2:
        raise FinetuneError("label issues need at least two classes and a class with two images or more")
    x = normalize(features)
    splitter = StratifiedKFold(n_splits=int(min(folds, counts.max())), shuffle=True, random_state=seed)
    log_probabilities = np.full((len(x), num_classes), MISSING_LOG_PROBABILITY, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the least populated class has only N members": handled below
        for train, held_out in splitter.split(x, labels):
            present = np.unique(labels[train])
            if len(present) < 2:
                log_probabilities[held_out, labels[train][0]] = 0.0
                continue
            dims = max(1, min(PCA_DIMS, len(train) - 1, x.shape[1]))
            model = make_pipeline(PCA(dims, random_state=seed), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"))
            model.fit(x[train], labels[train])
            decision = model.decision_function(x[held_out])
            if decision.ndim == 1:  # two classes: the log-odds of the second
                decision = np.column_stack([np.zeros_like(decision), decision])
            log_probabilities[np.ix_(held_out, model.classes_)] = log_softmax(decision, axis=1)
    return log_probabilities


def confident_learning(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's off-diagonal of the confident joint (module docstring).

    Returns:
        ``(is_issue, suggested)``: a boolean mask of likely label errors and each image's confident class
        (its given label where no class is confident).
    """
    labels = np.asarray(labels)
    n, c = probabilities.shape
    thresholds = np.full(c, np.inf)
    for j in range(c):
        if (labels == j).any():
            thresholds[j] = probabilities[labels == j, j].mean()
    confident = probabilities >= thresholds
    masked = np.where(confident, probabilities, -1.0)
    suggested = np.where(confident.any(axis=1), masked.argmax(axis=1), labels)
    return suggested != labels, suggested


def outlier_distances(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distance of each image to the nearest class centroid, and that class."""
    x = normalize(features)
    labels = np.asarray(labels)
    centroids = np.stack([x[labels == j].mean(axis=0) if (labels == j).any() else np.zeros(x.shape[1])
                          for j in range(num_classes)])
    similarity = x @ normalize(centroids).T
    nearest = similarity.argmax(axis=1)
    return 1.0 - similarity[np.arange(len(x)), nearest], nearest


# ---------------------------------------------------------------------------------------------- audit

def audit_features(
    manifest: Manifest,
    features: np.ndarray,
    *,
    duplicate_cosine: float = DUPLICATE_COSINE,
    copy_similarity: float = COPY_SIMILARITY,
    folds: int = FOLDS,
    seed: int = 0,
    load: Callable[[int], np.ndarray] | None = None,
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
    manifest, _ = prepare_manifest(root if root is not None else source, manifest=source if root is not None else None,
                                   card=card, val=val, test=test, seed=seed)
    start = time.perf_counter()
    features, cached, embedding = embed_manifest(
        manifest, backbone=backbone, pretrained=pretrained, input_size=input_size, device=device,
        batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
    )
    took = time.perf_counter() - start
    audit = audit_features(manifest, features, duplicate_cosine=duplicate_cosine, copy_similarity=copy_similarity,
                           folds=folds, seed=seed)
    audit.settings = {**embedding, **audit.settings}
    audit.seconds = {"features": took, **audit.seconds}
    audit.features_cached = cached
    return audit


# -------------------------------------------------------------------------------------------- writers

def summary_text(audit: Audit, out_dir: str | os.PathLike | None = None) -> str:
    """The one-paragraph summary ``finetune data audit`` prints."""
    s = audit.summary()
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    size = "×".join(str(v) for v in audit.settings.get("input_size", []))
    total = sum(audit.seconds.values())
    text = (
        f"Audited {s['images']} images of {s['classes']} classes ({splits}) with {audit.settings.get('backbone')} "
        f"at {size} px ({'cached features' if audit.features_cached else 'features extracted'}; {total:.1f}s). "
        f"Near-duplicates: {s['near_duplicate_groups']} group(s) of {s['near_duplicate_images']} images, "
        f"{s['leaking_groups']} spanning splits (leakage: {s['leaked_images']} val/test image(s) with a near-copy "
        f"in train). Blank or single-colour images: {s['blank_images']} (listed on their own; copies only of one "
        f"of the same size and colour). Label issues: {s['label_issues']} image(s) whose label the out-of-fold classifier confidently "
        f"contradicts. Outliers: {s['outliers_flagged']} image(s) far from every class."
    )
    return text + (f" Details in {out_dir}." if out_dir is not None else "")


def to_json(audit: Audit, files: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``--json`` object: summary, settings, seconds, the three lists and the files written."""
    return {"summary": audit.summary(), "settings": audit.settings, "features_cached": audit.features_cached,
            "seconds": {k: round(v, 3) for k, v in audit.seconds.items()}, "near_duplicates": audit.near_duplicates,
            "label_issues": audit.label_issues, "outliers": audit.outliers, "blank_images": audit.blank_images,
            "files": files or {}}


def write_audit(audit: Audit, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``near_duplicates.csv``, ``blank_images.csv``, ``label_issues.csv``, ``outliers.csv`` and
    ``audit.html`` into ``out_dir``, as one folder swapped in atomically (as checkpoints are): a crash leaves
    the previous audit there, or none, never a mix of old and new files or a half-written one.

    Returns:
        File name → path written.

    Raises:
        FinetuneError: ``out_dir`` is a file, or a folder holding anything but an earlier audit's files
            (replacing it would delete them), or cannot be written.
    """
    from finetune.evaluation.audit_report import render_audit

    out = Path(out_dir)
    check_audit_folder(out)
    duplicates = [
        (g["group"], int(g["leak"]), path, split, label, g["similarity"])
        for g in audit.near_duplicates for path, split, label in zip(g["paths"], g["splits"], g["classes"])
    ]
    tables = {
        "near_duplicates.csv": (("group", "leak", "path", "split", "class", "similarity"), duplicates),
        "blank_images.csv": (("path", "split", "class", "colour"),
                             [(b["path"], b["split"], b["class"], b["colour"]) for b in audit.blank_images]),
        "label_issues.csv": (("rank", "path", "split", "given", "suggested", "score", "p_given", "p_suggested"),
                             [(n, *r.values()) for n, r in enumerate(audit.label_issues, 1)]),
        "outliers.csv": (("rank", "path", "split", "class", "distance", "nearest_class", "flagged"),
                         [(n, *list(r.values())[:-1], int(r["flagged"])) for n, r in enumerate(audit.outliers, 1)]),
    }
    html = render_audit(audit.manifest, audit.near_duplicates, audit.label_issues, audit.outliers,
                        summary=summary_text(audit), settings=audit.settings)

    def write(tmp: Path) -> None:
        for name, (header, rows) in tables.items():
            (tmp / name).write_text(_csv(header, rows), encoding="utf-8")
        (tmp / "audit.html").write_text(html, encoding="utf-8")

    write_dir_atomic(out, write)
    return {name: str(out / name) for name in FILES}


def check_audit_folder(out: Path, data_root: str | os.PathLike | None = None) -> None:
    """Refuse an audit ``--out`` that is a file, holds anything but an earlier audit's `FILES` (the audit
    replaces the whole folder), or is (or is inside) the data root, as ``finetune train`` refuses a run
    folder there: the next scan would take the audit's files for data."""
    if data_root is not None:
        root, resolved = Path(data_root).resolve(), out.resolve()
        if resolved == root or root in resolved.parents:
            raise FinetuneError(f"--out {out} is inside the data root {data_root}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; give a folder for the audit")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if others:
            raise FinetuneError(f"--out {out} holds files that are not an audit's ({', '.join(others[:3])}"
                                f"{', …' if len(others) > 3 else ''}); the audit replaces the whole folder: give a "
                                "new folder or an earlier audit's")


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()
