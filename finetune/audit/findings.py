"""`audit_dataset`: near-duplicates and leakage, likely label errors and outliers, from backbone features.

The audit package (see docs/ARCHITECTURE.md): it composes the data layer (manifest,
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
* **Multi-label label issues** (`multilabel_label_issues`, for a labels CSV): each label in turn as a two-class
  problem (present / absent), as cleanlab's multi-label ``find_label_issues`` does one-vs-rest: the same
  out-of-fold probabilities and confident learning per label, so an image is flagged for a label it likely lacks
  (``missing``: absent, confidently present) or likely should not have (``extra``). Scored and ranked as above.
  A label with fewer than two images on either side is not checked.
* **Outliers** (`outlier_distances`): cosine distance of each image to the nearest class centroid (mean
  of the class's normalised features), highest first; ``flagged`` when above the median plus 6 median
  absolute deviations of all distances.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy.special import log_softmax
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline

from finetune.data.similarity import (COPY_SIMILARITY, FLAT_LEVELS, flat_copies, flat_signature, thumbnail_vector,
                                      thumbnail_views, view_similarity)
from finetune.errors import FinetuneError

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


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------------------------- near-duplicates

def nearest_neighbours(features: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most cosine-similar other rows: ``(indices, similarities)``, both ``N×k``."""
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


def multilabel_label_issues(features: np.ndarray, targets: np.ndarray, *, folds: int = FOLDS, seed: int = 0
                            ) -> list[tuple[int, int, str, float, float, float]]:
    """Per-label confident learning of a multi-label dataset (module docstring).

    Args:
        features: ``N×F`` features.
        targets: ``N×C`` multi-hot labels.

    Returns:
        ``(row, label, kind, score, p_given, p_suggested)`` per flagged (image, label): ``kind`` ``missing`` or
        ``extra``; ``score`` ``-log p(given state)``; the probabilities of the given and the suggested state.
    """
    y = np.asarray(targets).astype(np.int64)
    found = []
    for c in range(y.shape[1]):
        column = y[:, c]
        if min(column.sum(), len(column) - column.sum()) < 2:
            continue
        log_probabilities = out_of_fold_log_probabilities(features, column, 2, folds=folds, seed=seed)
        probabilities = np.exp(log_probabilities)
        is_issue, _ = confident_learning(column, probabilities)
        for i in np.flatnonzero(is_issue):
            given = int(column[i])
            found.append((int(i), c, "extra" if given else "missing", -float(log_probabilities[i, given]),
                          float(probabilities[i, given]), float(probabilities[i, 1 - given])))
    return found


def outlier_distances(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distance of each image to the nearest class centroid, and that class."""
    x = normalize(features)
    labels = np.asarray(labels)
    centroids = np.stack([x[labels == j].mean(axis=0) if (labels == j).any() else np.zeros(x.shape[1])
                          for j in range(num_classes)])
    similarity = x @ normalize(centroids).T
    nearest = similarity.argmax(axis=1)
    return 1.0 - similarity[np.arange(len(x)), nearest], nearest
