"""``evaluate``: run a model over labelled images and write metrics, tables, plots and ``report.html``.

Files written into ``out_dir`` (each atomically; ``metrics.json`` last, so its presence means the rest is
complete):

* ``per_class.csv``: ``class, precision, recall, f1, support, top_confusion, top_confusion_count``.
* ``confusion_matrix.csv``: counts, rows true and columns predicted, class names as header and first column.
* ``confusion_matrix.png`` (counts) and ``confusion_matrix_normalized.png`` (each row divided by its
  total); with more than 30 classes they are ordered by confusion clusters and
  ``confusion_matrix_top.png`` zooms on the 30 classes of the most frequent confusions.
* ``most_confused.csv``: ``true, predicted, count`` for every confused pair, most frequent first.
* ``misclassified.csv``: ``path, true, predicted, confidence, true_probability``, most confident first.
* ``report.html``: see :mod:`finetune.evaluation.report`. With a timm backbone plus a head, its thumbnails of
  the worst mistakes and of the most confident correct prediction of each class carry a Grad-CAM heat-map
  of the predicted class (:mod:`finetune.evaluation.explain`).
* ``reliability.png``: the reliability diagram (accuracy against confidence), before and after the
  checkpoint's temperature (:mod:`finetune.inference.temperature`) when it has one.
* ``metrics.json``: the headline numbers of :func:`~finetune.evaluation.classification_metrics` (with the
  temperature applied), plus the unreadable images left out; ``calibration`` (``temperature``,
  ``ece_before``, ``ece_after``, ``loss_before``, ``loss_after``) for a calibrated model, and ``tta`` (the
  same headline numbers with test-time augmentation, :mod:`finetune.inference.tta`) when asked for.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from finetune._io import atomic_write_bytes, check_output, csv_text, ensure_folder
from finetune.data import ImageDecodeError, load_image
from finetune.errors import FinetuneError
from finetune.evaluation.explain import encode, explain_images, supports_cam
from finetune.evaluation.metrics import (
    classification_metrics,
    most_confused_pairs,
    per_class_rows,
)
from finetune.evaluation.plots import (
    ANNOTATE_MAX_CLASSES,
    cluster_order,
    confusion_matrix_png,
    most_confused_classes,
    reliability_png,
)
from finetune.evaluation.report import render_report
from finetune.inference.predictor import eval_transform, predict_probabilities
from finetune.inference.temperature import scaled, softmax
from finetune.inference.tta import VIEWS, TtaModel, TtaTransform, check_mode

logger = logging.getLogger(__name__)

REPORT_THUMBNAILS = 24
"""How many of the worst misclassifications the report shows as thumbnails."""
CORRECT_PER_CLASS = 1
"""How many correct predictions of each class (the most confident) the report shows with their heat-map."""
_THUMBNAIL_SIZE = 160
HEADLINE_KEYS = ("accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "ece", "loss", "num_samples")
"""The metrics ``tta`` repeats with test-time augmentation."""


def evaluate(
    model: nn.Module,
    items: Sequence[tuple[str | os.PathLike, int]],
    *,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any],
    out_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | str = 0,
    run_dir: str | os.PathLike | None = None,
    amp_dtype: torch.dtype | None = None,
    labels: Sequence[int] | None = None,
    details: Mapping[str, Any] | None = None,
    progress: bool = False,
    explain: bool = True,
    temperature: float = 1.0,
    tta: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on labelled images and write every evaluation file into ``out_dir``.

    Args:
        model: images → logits (a :class:`~finetune.models.FinetuneModel`); set to eval mode here.
        items: ``(image path, class index)`` pairs, indices into ``class_names``.
        class_names: the model's classes in index order.
        preprocessing: the checkpoint's preprocessing; the eval transform is built from it.
        out_dir: the folder to write into (created if missing; other files in it are left alone). It is
            checked before the model runs; a file that cannot be written leaves its previous version.
        device: where the model runs.
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images, or ``"auto"`` (the CPU cores, at most 8: the
            training's policy, what ``finetune eval`` uses).
        run_dir: the training run the model comes from; its ``training_curves.png`` and ``metrics.csv``
            go into the report.
        amp_dtype: autocast dtype, or ``None`` for full precision.
        labels: the class indices the macro averages run over (default: all), e.g. the classes a data
            set shares with the model.
        details: what was evaluated (checkpoint, data, split ...), listed in the report.
        progress: show a progress bar on stderr.
        explain: put Grad-CAM heat-maps on the report's thumbnails (one forward and backward pass per
            thumbnail; only for a model with a timm backbone and a head).
        temperature: the calibration temperature the logits are divided by (the checkpoint's); metrics
            are reported with it, and ``calibration`` compares them with the raw logits' when it is not 1.
        tta: also evaluate with this test-time augmentation (:data:`finetune.inference.tta.TTA_MODES`); its
            metrics go under ``tta``.

    Returns:
        The contents of ``metrics.json``.

    Raises:
        FinetuneError: no items, a label outside ``class_names``, no readable image, a model whose
            outputs do not match ``class_names``, or an ``out_dir`` that cannot be written.
    """

    if not items:
        raise FinetuneError("nothing to evaluate: no images")
    check_output(out_dir, folder=True)  # before the predictions, which may take long
    paths = [str(p) for p, _ in items]
    targets = np.array([int(t) for _, t in items], dtype=np.int64)
    if targets.min() < 0 or targets.max() >= len(class_names):
        raise FinetuneError(f"image labels must be class indices below {len(class_names)}")
    if tta is not None:
        check_mode(tta)
    device = torch.device(device)
    model = model.to(device).eval()
    indices, logits, unreadable = evaluation_logits(model, paths, preprocessing, outputs=len(class_names),
                                                    device=device, batch_size=batch_size, num_workers=num_workers,
                                                    amp_dtype=amp_dtype, progress=progress)
    y_true = targets[indices]
    probs = softmax(logits, temperature)
    metrics = classification_metrics(y_true, probs, class_names=class_names, labels=labels)
    confusion = metrics.pop("confusion")
    metrics.pop("per_class_recall")
    curves = [("model", probs)]
    if temperature != 1.0:
        raw = classification_metrics(y_true, softmax(logits), class_names=class_names, labels=labels)
        metrics["calibration"] = {"temperature": temperature, "ece_before": raw["ece"], "ece_after": metrics["ece"],
                                  "loss_before": raw["loss"], "loss_after": metrics["loss"]}
        curves = [("before (T = 1)", softmax(logits)), (f"after (T = {temperature:.3g})", probs)]
    if tta is not None:
        tta_indices, tta_probs, _ = predict_probabilities(
            TtaModel(scaled(model, temperature)), [paths[i] for i in indices],
            TtaTransform(eval_transform(preprocessing), tta), device=device,
            batch_size=max(1, batch_size // VIEWS[tta]),  # a forward pass over the views of these images
            num_workers=num_workers, amp_dtype=amp_dtype, progress=_progress_bar(progress),
        )
        tta_metrics = classification_metrics(y_true[tta_indices], tta_probs, class_names=class_names, labels=labels)
        metrics["tta"] = {"views": tta, **{k: tta_metrics[k] for k in HEADLINE_KEYS}}
    metrics["num_unreadable"] = len(unreadable)
    metrics["unreadable"] = [{"path": p, "reason": r} for p, r in unreadable]

    out = ensure_folder(out_dir)
    names = list(class_names)
    rows = per_class_rows(confusion, names)
    pairs = most_confused_pairs(confusion, names)
    wrong = _misclassified(indices, probs, y_true, paths, names)

    _write_tables(out, rows, confusion, names, pairs, wrong)
    figures = _confusion_figures(confusion, names)
    for filename, (_, png) in figures.items():
        atomic_write_bytes(out / filename, png)
    reliability = reliability_png(y_true, curves)
    atomic_write_bytes(out / "reliability.png", reliability)
    if "confusion_matrix_top.png" not in figures:  # from an earlier evaluation with more classes
        (out / "confusion_matrix_top.png").unlink(missing_ok=True)

    curves, log = _run_history(run_dir)
    shown = wrong[:REPORT_THUMBNAILS]
    correct = _most_confident_correct(indices, probs, y_true, paths, names)
    note = _add_heatmaps(model, [*shown, *correct], names, preprocessing, device, batch_size) if explain else ""
    for item in [*shown, *correct]:
        if not item.get("heatmap"):
            item["thumbnail"] = thumbnail(item["path"])
    report = render_report(
        title=f"Evaluation: {metrics['num_samples']} images, {len(names)} classes",
        metrics=metrics,
        per_class=rows,
        most_confused=pairs[:100],
        misclassified=shown,
        correct=correct,
        explanation_note=note,
        confusion_figures=list(figures.values()),
        training_curves=curves,
        training_log=log,
        details={**(details or {}), "run folder": str(run_dir) if run_dir else "none"},
        unreadable=unreadable,
        reliability=reliability,
    )
    atomic_write_bytes(out / "report.html", report.encode("utf-8"))
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
    return metrics


def align_classes(
    data_classes: Sequence[str], model_classes: Sequence[str], *, allow_subset: bool = False
) -> dict[int, int]:
    """Map a data set's class indices to a model's by class name.

    Args:
        data_classes: the data set's class names in its index order.
        model_classes: the model's class names in its index order.
        allow_subset: accept data whose classes differ, mapping only the shared ones (with a warning).

    Returns:
        Data class index → model class index, for every shared class.

    Raises:
        FinetuneError: the classes differ (naming the differences) and ``allow_subset`` is false, or no
            class is shared.
    """
    model_index = {name: i for i, name in enumerate(model_classes)}
    mapping = {i: model_index[name] for i, name in enumerate(data_classes) if name in model_index}
    missing = sorted(set(model_classes) - set(data_classes))
    extra = sorted(set(data_classes) - set(model_classes))
    if not missing and not extra:
        return mapping
    differences = "; ".join(
        f"{len(names)} {what}: {_some(names)}"
        for what, names in (("checkpoint classes not in the data", missing), ("data classes not in the checkpoint", extra))
        if names
    )
    if not mapping:
        raise FinetuneError(f"the data shares no class with the checkpoint ({differences})")
    if not allow_subset:
        raise FinetuneError(
            f"the data's classes differ from the checkpoint's: {differences} "
            f"(use --allow-subset to evaluate the {len(mapping)} shared classes)"
        )
    logger.warning("evaluating the %d classes shared with the checkpoint; %s", len(mapping), differences)
    return mapping


def _some(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _write_tables(
    out: Path,
    rows: list[dict[str, Any]],
    confusion: np.ndarray,
    names: list[str],
    pairs: list[tuple[str, str, int]],
    wrong: list[dict[str, Any]],
) -> None:
    """per_class.csv, confusion_matrix.csv, most_confused.csv and misclassified.csv."""
    atomic_write_bytes(out / "per_class.csv", _csv(
        ["class", "precision", "recall", "f1", "support", "top_confusion", "top_confusion_count"],
        [[r["class"], f"{r['precision']:.6f}", f"{r['recall']:.6f}", f"{r['f1']:.6f}", r["support"],
          r["top_confusion"], r["top_confusion_count"]] for r in rows],
    ))
    atomic_write_bytes(out / "confusion_matrix.csv", _csv(
        ["true\\predicted", *names], [[name, *map(int, confusion[i])] for i, name in enumerate(names)]
    ))
    atomic_write_bytes(out / "most_confused.csv", _csv(["true", "predicted", "count"], pairs))
    atomic_write_bytes(out / "misclassified.csv", _csv(
        ["path", "true", "predicted", "confidence", "true_probability"],
        [[w["path"], w["true"], w["predicted"], f"{w['confidence']:.6f}", f"{w['true_probability']:.6f}"]
         for w in wrong],
    ))


def _misclassified(
    indices: np.ndarray, probs: np.ndarray, y_true: np.ndarray, paths: Sequence[str], names: Sequence[str]
) -> list[dict[str, Any]]:
    """The wrong predictions, most confident first (ties by path)."""
    y_pred = probs.argmax(axis=1)
    rows = [
        {
            "path": paths[indices[r]],
            "true": names[y_true[r]],
            "predicted": names[y_pred[r]],
            "confidence": float(probs[r, y_pred[r]]),
            "true_probability": float(probs[r, y_true[r]]),
        }
        for r in np.flatnonzero(y_pred != y_true)
    ]
    return sorted(rows, key=lambda w: (-w["confidence"], w["path"]))


def _most_confident_correct(
    indices: np.ndarray, probs: np.ndarray, y_true: np.ndarray, paths: Sequence[str], names: Sequence[str]
) -> list[dict[str, Any]]:
    """The :data:`CORRECT_PER_CLASS` most confident correct predictions of each class, in class order."""
    y_pred = probs.argmax(axis=1)
    rows = []
    for c, name in enumerate(names):
        hits = np.flatnonzero((y_true == c) & (y_pred == c))
        for r in hits[np.argsort(-probs[hits, c], kind="stable")][:CORRECT_PER_CLASS]:
            rows.append({"path": paths[indices[r]], "true": name, "predicted": name, "confidence": float(probs[r, c])})
    return rows


def _progress_bar(enabled: bool):
    """A tqdm wrapper of the evaluation's batches on a terminal, or None."""
    if not enabled:
        return None

    def wrap(loader):
        return tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not sys.stderr.isatty())

    return wrap


def evaluation_logits(model: nn.Module, paths: Sequence[str], preprocessing: Mapping[str, Any], *, outputs: int,
                      device: torch.device, batch_size: int, num_workers, amp_dtype, progress: bool, what: str = "classes"
                      ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """The logits of every readable image (an evaluation's forward pass, with its progress bar): ``(indices of the
    images read, logits, (path, reason) of the unreadable ones)``.

    Raises:
        FinetuneError: no image could be read, or the model gives other than ``outputs`` outputs.
    """
    indices, logits, errors = predict_probabilities(
        model, paths, eval_transform(preprocessing), device=device, batch_size=batch_size,
        num_workers=num_workers, amp_dtype=amp_dtype, progress=_progress_bar(progress), logits=True,
    )
    unreadable = [(paths[i], errors[i]) for i in sorted(errors)]
    if unreadable:
        logger.warning("left out %d unreadable image(s), e.g. %s: %s", len(unreadable), *unreadable[0])
    if not len(indices):
        raise FinetuneError(f"none of the {len(paths)} images could be read (e.g. {unreadable[0][0]}: {unreadable[0][1]})")
    if logits.shape[1] != outputs:
        raise FinetuneError(f"the model gives {logits.shape[1]} outputs for {outputs} {what}")
    return indices, logits, unreadable


def _add_heatmaps(
    model: nn.Module, items: list[dict[str, Any]], names: Sequence[str], preprocessing: Mapping[str, Any],
    device: torch.device, batch_size: int,
) -> str:
    """Set each item's ``heatmap`` (a JPEG of its image with the Grad-CAM of its predicted class); return the
    note the report shows about them."""

    if not supports_cam(model):
        return f"No heat-maps: the model ({type(model).__name__}) is not a timm backbone plus a head."
    index = {name: i for i, name in enumerate(names)}
    explanations, _ = explain_images(
        model, [item["path"] for item in items], eval_transform(preprocessing), mean=preprocessing["mean"],
        std=preprocessing["std"], targets=[index[item["predicted"]] for item in items], device=device,
        batch_size=min(batch_size, 16),
    )
    for item, explanation in zip(items, explanations):
        item["heatmap"] = encode(explanation.overlay()) if explanation is not None else None
    return ("Heat-maps: Grad-CAM of the predicted class on the image the model saw (after its resize and crop); "
            "red marks the regions whose features raised that class's score most.")


def _confusion_figures(confusion: np.ndarray, names: list[str]) -> dict[str, tuple[str, bytes]]:
    """File name → (caption, PNG) of the confusion-matrix plots."""
    many = len(names) > ANNOTATE_MAX_CLASSES
    order = cluster_order(confusion) if many else None
    ordering = ", classes ordered by confusion clusters" if many else ""
    figures = {
        "confusion_matrix.png": (f"Counts{ordering}", confusion_matrix_png(
            confusion, names, order=order, title=f"Confusion matrix (counts){ordering}")),
        "confusion_matrix_normalized.png": (f"Row-normalised (recall on the diagonal){ordering}", confusion_matrix_png(
            confusion, names, normalize=True, order=order, title=f"Confusion matrix (row-normalised){ordering}")),
    }
    block = most_confused_classes(confusion)
    if many and len(block) > 1:
        sub = confusion[np.ix_(block, block)]
        figures["confusion_matrix_top.png"] = (
            f"Zoom: the {len(block)} classes of the most frequent confusions (counts)",
            confusion_matrix_png(sub, [names[i] for i in block], order=cluster_order(sub),
                                 title="Most confused classes (counts)"),
        )
    return figures


def _run_history(run_dir: str | os.PathLike | None) -> tuple[bytes | None, list[dict[str, str]]]:
    """The run's training-curves PNG and metrics.csv rows, where present."""
    if run_dir is None:
        return None, []
    run_dir = Path(run_dir)
    curves_path, log_path = run_dir / "training_curves.png", run_dir / "metrics.csv"
    curves = curves_path.read_bytes() if curves_path.is_file() else None
    log: list[dict[str, str]] = []
    if log_path.is_file():
        with open(log_path, newline="", encoding="utf-8") as f:
            log = list(csv.DictReader(f))
    return curves, log


def thumbnail(path: str) -> bytes | None:
    """A JPEG thumbnail of an image file, or ``None`` when it cannot be read."""


    try:
        image = Image.fromarray(load_image(path))
    except ImageDecodeError:
        return None
    image.thumbnail((_THUMBNAIL_SIZE, _THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    return csv_text(header, rows).encode("utf-8")
