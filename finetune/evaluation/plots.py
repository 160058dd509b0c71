"""Confusion-matrix heat-maps that stay readable from 2 to several hundred classes.

The figure grows with the class count (a fixed cell size, capped so a side stays under ~40 inches),
tick labels shrink with the cells, cell values are written in only while they fit, empty cells stay white
and colours follow a square-root scale so the few off-diagonal counts are not washed out by the diagonal.
With many classes, :func:`cluster_order` puts classes that are confused with each other next to each
other, and :func:`most_confused_classes` picks a block worth a zoomed plot.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state) and returned as PNG bytes.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

ANNOTATE_MAX_CLASSES = 30
"""Cell values are printed when the plot has at most this many classes."""
_MAX_SIDE_INCHES = 40.0
_DPI = 100


def row_normalize(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of a true class predicted as each class); empty rows stay 0."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def cluster_order(confusion: np.ndarray) -> np.ndarray:
    """A class order that puts classes confused with each other next to each other.

    Classes are clustered (average linkage, optimal leaf order) by how often they are mistaken for each
    other: the symmetrised off-diagonal of the row-normalised matrix.

    Returns:
        A permutation of ``range(C)``.
    """

    num_classes = len(confusion)
    if num_classes < 3:
        return np.arange(num_classes)
    rates = row_normalize(confusion)
    np.fill_diagonal(rates, 0.0)
    similarity = rates + rates.T
    distance = similarity.max() - similarity
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average", optimal_ordering=True)
    return leaves_list(tree)


def most_confused_classes(confusion: np.ndarray, size: int = ANNOTATE_MAX_CLASSES) -> np.ndarray:
    """Up to ``size`` class indices taking part in the most frequent confusions, gathered pair by pair
    (largest off-diagonal counts first), sorted by index."""
    wrong = np.asarray(confusion).copy()
    np.fill_diagonal(wrong, 0)
    true_idx, pred_idx = np.nonzero(wrong)
    picked: list[int] = []
    for o in np.argsort(-wrong[true_idx, pred_idx], kind="stable"):
        for c in (int(true_idx[o]), int(pred_idx[o])):
            if c not in picked and len(picked) < size:
                picked.append(c)
        if len(picked) >= size:
            break
    return np.array(sorted(picked), dtype=np.int64)


def confusion_matrix_png(
    confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    normalize: bool = False,
    order: Sequence[int] | None = None,
    title: str = "Confusion matrix",
) -> bytes:
    """Draw a confusion matrix (rows true, columns predicted) as a PNG.

    Args:
        confusion: ``C×C`` counts.
        class_names: the ``C`` class names in index order.
        normalize: plot each row's fractions (recall on the diagonal) instead of counts.
        order: the class order along both axes (default: index order).
        title: the figure title.

    Returns:
        The PNG file's bytes.
    """
    confusion = np.asarray(confusion)
    order = np.arange(len(confusion)) if order is None else np.asarray(order)
    values = row_normalize(confusion) if normalize else confusion.astype(np.float64)
    values = values[np.ix_(order, order)]
    names = [str(class_names[i]) for i in order]
    n = len(names)

    cell = min(0.3 if n <= ANNOTATE_MAX_CLASSES else 0.14, _MAX_SIDE_INCHES / max(n, 1))
    font = float(np.clip(cell * 72 * 0.7, 2.0, 9.0))
    label_inches = min(max(len(s) for s in names), 40) * font * 0.6 / 72 + 0.6
    side = n * cell
    fig = Figure(figsize=(max(side + label_inches + 1.6, 5.0), max(side + label_inches + 0.8, 4.0)), dpi=_DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))  # bbox_inches="tight" below trims to the axes and labels

    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    cmap = _colormap()
    image = ax.imshow(
        np.ma.masked_equal(values, 0.0), cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=vmax),
        interpolation="nearest", aspect="equal",
    )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    # parse_math=False: a class named "$x$" is text, not mathtext (which could also fail to parse)
    ax.set_xticklabels(names, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticklabels(names, fontsize=font, parse_math=False)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted", fontsize=max(font, 8))
    ax.set_ylabel("true", fontsize=max(font, 8))
    ax.set_title(title, fontsize=max(font + 2, 10), parse_math=False)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#e5e5e5", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    if n <= ANNOTATE_MAX_CLASSES:
        _annotate(ax, values, vmax, normalize, font)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="fraction of true class" if normalize else "count")

    return figure_png(fig, dpi=_DPI, tight=True)


def figure_png(fig, *, dpi: int, tight: bool = False) -> bytes:
    """A matplotlib ``Figure`` as PNG bytes (cropped to its content with ``tight``): the one figure-to-PNG
    step of every plot finetune writes (confusion matrices, reliability, training curves, the LR finder)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return buffer.getvalue()


def _colormap():
    import matplotlib  # lazy: matplotlib is slow to import and only figures need it

    return matplotlib.colormaps["viridis_r"].with_extremes(bad="white")


def _annotate(ax, values: np.ndarray, vmax: float, normalize: bool, font: float) -> None:
    for (i, j), v in np.ndenumerate(values):
        if v == 0:
            continue
        text = f"{v:.2f}" if normalize else f"{int(v)}"
        ax.text(j, i, text, ha="center", va="center", fontsize=font * 0.85,
                color="white" if (v / vmax) ** 0.5 > 0.55 else "black")


def reliability_png(y_true: np.ndarray, curves: Sequence[tuple[str, np.ndarray]], bins: int = 15) -> bytes:
    """A reliability diagram: per confidence bin (``bins`` equal-width, as the ECE), the accuracy of the
    top-1 predictions against their mean confidence, one line per ``(label, probabilities)`` curve (e.g.
    before and after temperature scaling), with the diagonal of perfect calibration."""
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect calibration")
    for label, probs in curves:
        confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y_true)
        which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
        used = np.unique(which)
        ax.plot([confidence[which == b].mean() for b in used], [correct[which == b].mean() for b in used], "o-",
                label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title="Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return figure_png(fig, dpi=_DPI)


def pr_curves_png(y_true: np.ndarray, y_prob: np.ndarray, names: Sequence[str], thresholds: Sequence[float],
                  columns: int = 5) -> bytes:
    """Per-label precision-recall curves of a multi-label evaluation (scikit-learn's ``precision_recall_curve``),
    a grid of small plots titled with each label's AP, the dot marking its operating point at ``thresholds``; a
    label without a positive gets an empty plot saying so."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    count = len(names)
    columns = min(columns, max(count, 1))
    rows = -(-count // columns)
    fig = Figure(figsize=(2.6 * columns, 2.4 * rows))
    for c, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, c + 1)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.tick_params(labelsize=7)
        if not y_true[:, c].any():
            ax.set_title(f"{name}: no positive", fontsize=8)
            continue
        precision, recall, _ = precision_recall_curve(y_true[:, c], y_prob[:, c])
        ax.plot(recall, precision, lw=1.2)
        chosen = y_prob[:, c] >= thresholds[c]
        hits = int((chosen & (y_true[:, c] == 1)).sum())
        ax.plot([hits / y_true[:, c].sum()], [hits / chosen.sum() if chosen.any() else 1.0], "o", color="C3", ms=4)
        ax.set_title(f"{name}: AP {average_precision_score(y_true[:, c], y_prob[:, c]):.3f}", fontsize=8)
        ax.grid(alpha=0.3)
        if c % columns == 0:
            ax.set_ylabel("precision", fontsize=7)
        if c >= count - columns:
            ax.set_xlabel("recall", fontsize=7)
    fig.tight_layout()
    return figure_png(fig, dpi=_DPI)
