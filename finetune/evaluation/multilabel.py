"""Multi-label metrics and thresholds from multi-hot targets and per-label probabilities, on scikit-learn.

Pure numpy, like :mod:`finetune.evaluation.metrics`: :func:`multilabel_metrics` gives the headline numbers (mAP
macro and micro by ``average_precision_score``, subset accuracy, Hamming loss, label-ranking average precision,
micro/macro F1 at the thresholds) and the per-label rows (AP, precision, recall, F1, support and the 2×2
confusion table); :func:`tune_thresholds` picks each label's threshold, and one global one, that maximise F1 on a
split (validation); :func:`confused_label_pairs` lists false positives of a label that co-occur with another.
"""
from __future__ import annotations

from itertools import permutations
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    label_ranking_average_precision_score,
    multilabel_confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from finetune.errors import FinetuneError

DEFAULT_THRESHOLD = 0.5


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_prob.shape:
        raise FinetuneError(f"multi-label targets and probabilities must both be N x C, got {y_true.shape} and "
                            f"{y_prob.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise FinetuneError("multi-label targets must be 0 or 1")
    return y_true.astype(np.int64), y_prob


def _thresholds(thresholds: float | Sequence[float] | None, classes: int) -> np.ndarray:
    if thresholds is None:
        return np.full(classes, DEFAULT_THRESHOLD)
    values = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (classes,))
    return values.copy()


def multilabel_metrics(y_true, y_prob, *, class_names: Sequence[str],
                       thresholds: float | Sequence[float] | None = None) -> dict[str, Any]:
    """mAP, set and per-label metrics of multi-label predictions.

    Labels without a positive contribute no AP (scikit-learn's would be undefined): ``map_macro`` averages over
    the labels that have one and says how many (``ap_labels``).

    Args:
        y_true: N × C multi-hot targets.
        y_prob: N × C per-label probabilities (sigmoid outputs).
        class_names: the C label names.
        thresholds: per-label thresholds (or one), default 0.5: a label is predicted at or above its threshold.

    Returns:
        ``map_macro``, ``map_micro``, ``ap_labels``, ``subset_accuracy``, ``hamming_loss``, ``lrap``, ``f1_micro``,
        ``f1_macro``, ``num_samples``, and ``per_class``: one row per label with ``class``, ``ap``, ``precision``,
        ``recall``, ``f1``, ``support``, ``tp``, ``fp``, ``fn``, ``tn`` and its ``threshold``.
    """
    y_true, y_prob = _check(y_true, y_prob)
    if len(class_names) != y_true.shape[1]:
        raise FinetuneError(f"{len(class_names)} label names for {y_true.shape[1]} columns")
    cut = _thresholds(thresholds, y_true.shape[1])
    y_pred = (y_prob >= cut).astype(np.int64)
    present = y_true.sum(0) > 0
    ap = np.full(y_true.shape[1], np.nan)
    for c in np.flatnonzero(present):
        ap[c] = average_precision_score(y_true[:, c], y_prob[:, c])
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    confusion = multilabel_confusion_matrix(y_true, y_pred)
    rows = [{"class": name, "ap": None if np.isnan(ap[c]) else float(ap[c]), "precision": float(precision[c]),
             "recall": float(recall[c]), "f1": float(f1[c]), "support": int(support[c]),
             "tp": int(confusion[c, 1, 1]), "fp": int(confusion[c, 0, 1]), "fn": int(confusion[c, 1, 0]),
             "tn": int(confusion[c, 0, 0]), "threshold": float(cut[c])} for c, name in enumerate(class_names)]
    has_label = y_true.sum(1) > 0
    return {
        "num_samples": int(len(y_true)),
        "map_macro": float(np.nanmean(ap)) if present.any() else 0.0,
        "map_micro": float(average_precision_score(y_true.ravel(), y_prob.ravel())) if y_true.any() else 0.0,
        "ap_labels": int(present.sum()),
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        # LRAP is defined over images with at least one label
        "lrap": float(label_ranking_average_precision_score(y_true[has_label], y_prob[has_label]))
        if has_label.any() else 0.0,
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": rows,
    }


def tune_thresholds(y_true, y_prob) -> dict[str, Any]:
    """Each label's threshold that maximises its F1 on these predictions, and the one global threshold that
    maximises micro F1.

    A label's candidates are its own predicted probabilities (scikit-learn's ``precision_recall_curve``); of
    equal F1, the highest wins (fewer false positives). The threshold returned is halfway between that probability
    and the next lower one seen (half of it where none is lower): it predicts exactly the same on these images, with
    the widest margin on both sides, so a prediction at the boundary does not flip with rounding (float32 against
    float64, or a calibration's rescaling). A label without a positive here keeps 0.5.

    Returns:
        ``{"per_class": [C floats], "global": float, "f1": [C floats] (each label's F1 at its threshold),
        "f1_micro_global": float}``.
    """
    y_true, y_prob = _check(y_true, y_prob)
    per_class, best_f1 = [], []
    for c in range(y_true.shape[1]):
        if not y_true[:, c].any():
            per_class.append(DEFAULT_THRESHOLD)
            best_f1.append(0.0)
            continue
        threshold, f1 = _best_f1(y_true[:, c], y_prob[:, c])
        per_class.append(threshold)
        best_f1.append(f1)
    threshold, f1 = _best_f1(y_true.ravel(), y_prob.ravel())
    return {"per_class": per_class, "global": threshold, "f1": best_f1, "f1_micro_global": f1}


def _best_f1(truth: np.ndarray, prob: np.ndarray) -> tuple[float, float]:
    precision, recall, thresholds = precision_recall_curve(truth, prob)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]  # thresholds ascend: the last of the best is the highest
    below = thresholds[best - 1] if best else 0.0
    return float((below + thresholds[best]) / 2), float(f1[best])


def confused_label_pairs(y_true, y_prob, *, class_names: Sequence[str], thresholds=None,
                         limit: int = 20) -> list[dict[str, Any]]:
    """Label pairs (A, B) where A is predicted without being there while B is there: the false positives of A
    that co-occur with B, most first (what a model confuses B for)."""
    y_true, y_prob = _check(y_true, y_prob)
    y_pred = y_prob >= _thresholds(thresholds, y_true.shape[1])
    false_positive = y_pred & (y_true == 0)
    rows = []
    for a, b in permutations(range(y_true.shape[1]), 2):
        count = int((false_positive[:, a] & (y_true[:, b] == 1)).sum())
        if count:
            rows.append({"predicted": class_names[a], "present": class_names[b], "count": count,
                         "of_false_positives": count / int(false_positive[:, a].sum())})
    rows.sort(key=lambda r: (-r["count"], r["predicted"], r["present"]))
    return rows[:limit]


def binary_calibration_error(y_true, y_prob, bins: int = 15) -> float:
    """The mean over labels of each label's expected calibration error as a binary problem: the sample-weighted
    gap between the frequency of the label and its mean predicted probability over ``bins`` equal-width bins."""
    y_true, y_prob = _check(y_true, y_prob)
    which = np.clip(np.ceil(y_prob * bins).astype(np.int64) - 1, 0, bins - 1)
    errors = []
    for c in range(y_true.shape[1]):
        gap = sum((which[:, c] == b).sum() * abs(y_true[which[:, c] == b, c].mean() - y_prob[which[:, c] == b, c].mean())
                  for b in np.unique(which[:, c]))
        errors.append(gap / len(y_true))
    return float(np.mean(errors))


def binary_log_loss(y_true, y_prob) -> float:
    """Mean binary cross-entropy over every image and label, probabilities clipped at 1e-12."""
    y_true, y_prob = _check(y_true, y_prob)
    p = np.clip(y_prob, 1e-12, 1 - 1e-12)
    return float(-(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)).mean())


def label_calibration(y_true, before, after) -> dict[str, float]:
    """ECE (per label, averaged) and binary log loss of uncalibrated and calibrated multi-label probabilities."""
    return {"ece_before": binary_calibration_error(y_true, before), "ece_after": binary_calibration_error(y_true, after),
            "loss_before": binary_log_loss(y_true, before), "loss_after": binary_log_loss(y_true, after)}
