"""Classification metrics from true labels and predicted probabilities, built on scikit-learn.

Everything here is pure numpy: :func:`classification_metrics` gives the headline numbers (the per-epoch
validation of ``finetune train`` and ``metrics.json`` of ``finetune eval``); the table helpers turn a
confusion matrix into the rows of ``per_class.csv`` and ``most_confused.csv``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from finetune.errors import FinetuneError
from finetune.inference.predictor import topk_indices

ECE_BINS = 15


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_prob: np.ndarray,
    *,
    class_names: Sequence[str],
    loss: float | None = None,
    labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Accuracy, top-5, balanced accuracy, macro/weighted F1, calibration and the confusion matrix.

    Classes that never occur in ``y_true`` are fine: their precision, recall and F1 count as 0 where
    undefined (scikit-learn's ``zero_division=0``). With fewer than 5 classes, ``top5_accuracy`` is
    top-``C`` accuracy (always 1).

    Args:
        y_true: true class indices, shape ``(N,)``.
        y_prob: class probabilities, shape ``(N, C)``, rows summing to 1 (softmax outputs).
        class_names: the ``C`` class names in index order.
        loss: the mean loss to report; by default the mean negative log-likelihood of ``y_prob``.
        labels: the class indices the macro and weighted averages run over (default: all ``C``);
            evaluating a data set that holds only some of the model's classes passes those.

    Returns:
        A dict with ``num_samples``, ``num_classes``, ``accuracy``, ``top5_accuracy``,
        ``balanced_accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``, ``weighted_f1``,
        ``ece`` (expected calibration error, 15 equal-width confidence bins), ``loss`` (all floats or
        ints), ``per_class_recall`` (class name → recall over every class) and ``confusion`` (a ``C×C``
        int ndarray, rows true, columns predicted).

    Raises:
        FinetuneError: for no samples, or shapes that do not match ``class_names``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob)
    if not np.issubdtype(y_prob.dtype, np.floating):
        y_prob = y_prob.astype(np.float32)  # float probabilities are used as they are: no float64 copy
    num_classes = len(class_names)
    if y_true.ndim != 1 or y_prob.shape != (len(y_true), num_classes):
        raise FinetuneError(
            f"metrics need y_true of shape (N,) and y_prob of shape (N, {num_classes}), "
            f"got {y_true.shape} and {y_prob.shape}"
        )
    if len(y_true) == 0:
        raise FinetuneError("no samples to compute metrics on")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise FinetuneError(f"true labels must lie in [0, {num_classes}), got {y_true.min()}..{y_true.max()}")

    y_pred = y_prob.argmax(axis=1)
    all_labels = np.arange(num_classes)
    averaged = all_labels if labels is None else np.asarray(labels, dtype=np.int64)
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=averaged, average="macro", zero_division=0
    )
    _, _, weighted_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=averaged, average="weighted", zero_division=0
    )
    _, recall, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=all_labels, average=None, zero_division=0
    )
    confusion = confusion_matrix(y_true, y_pred, labels=all_labels)
    present = np.bincount(y_true, minlength=num_classes) > 0
    if loss is None:
        loss = negative_log_likelihood(y_true, y_prob)
    return {
        "num_samples": int(len(y_true)),
        "num_classes": num_classes,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "top5_accuracy": topk_accuracy(y_true, y_prob, k=5),
        # scikit-learn's balanced_accuracy_score, without its warning for predicted classes absent from y_true
        "balanced_accuracy": float(recall[present].mean()),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "weighted_f1": float(weighted_f1),
        "ece": expected_calibration_error(y_true, y_prob),
        "loss": float(loss),
        "per_class_recall": {name: float(r) for name, r in zip(class_names, recall)},
        "confusion": confusion,
    }


def topk_accuracy(y_true: np.ndarray, y_prob: np.ndarray, k: int = 5) -> float:
    """Fraction of samples whose true class is among the ``min(k, C)`` most probable classes."""
    k = min(k, y_prob.shape[1])
    top = topk_indices(y_prob, k)
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def negative_log_likelihood(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean ``-log p(true class)``, with probabilities clipped at 1e-12 so a confident miss stays finite."""
    p_true = y_prob[np.arange(len(y_true)), y_true].astype(np.float64)
    return float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al., 2017): the sample-weighted mean gap between accuracy and
    top-1 confidence over ``bins`` equal-width confidence bins ``(lo, hi]``."""
    confidence = y_prob.max(axis=1).astype(np.float64)
    correct = y_prob.argmax(axis=1) == y_true
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = 0.0
    for b in np.unique(which):
        in_bin = which == b
        gap += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(gap / len(y_true))


def per_class_rows(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class from a confusion matrix (rows true, columns predicted).

    Returns:
        Dicts with ``class``, ``precision``, ``recall``, ``f1``, ``support``, ``top_confusion`` (the class
        most often predicted instead, ``""`` when none) and ``top_confusion_count``, in class index order.
        Undefined ratios count as 0, as in :func:`classification_metrics`.
    """
    confusion = np.asarray(confusion)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    wrong = confusion.copy()
    np.fill_diagonal(wrong, 0)
    rows = []
    for i, name in enumerate(class_names):
        j = int(wrong[i].argmax())
        count = int(wrong[i, j])
        rows.append({
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "top_confusion": class_names[j] if count else "",
            "top_confusion_count": count,
        })
    return rows


def most_confused_pairs(
    confusion: np.ndarray, class_names: Sequence[str], limit: int | None = None
) -> list[tuple[str, str, int]]:
    """``(true, predicted, count)`` for every non-zero off-diagonal cell, most frequent first (ties by
    class index), at most ``limit`` of them."""
    wrong = np.asarray(confusion).copy()
    np.fill_diagonal(wrong, 0)
    true_idx, pred_idx = np.nonzero(wrong)
    counts = wrong[true_idx, pred_idx]
    order = np.lexsort((pred_idx, true_idx, -counts))[:limit]
    return [(class_names[true_idx[o]], class_names[pred_idx[o]], int(counts[o])) for o in order]
