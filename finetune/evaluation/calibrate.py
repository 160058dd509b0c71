"""Calibrate a checkpoint: fit its temperature (:mod:`finetune.inference.temperature`) on labelled images, usually the
validation split, and store it in its ``checkpoint.json``. The end of training and ``finetune calibrate``
both run :func:`calibrate_checkpoint`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.evaluation.multilabel import label_calibration
from finetune.inference.temperature import (fit_label_temperatures, fit_temperature, meta_temperatures,
                                            rescale_thresholds, sigmoid, softmax)
from finetune.models.checkpoint import META_FILE, load_checkpoint, read_meta, resolve_checkpoint, write_json_atomic
from finetune.errors import FinetuneError
from finetune.evaluation.metrics import expected_calibration_error, negative_log_likelihood
from finetune.inference.predictor import eval_transform, predict_probabilities


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    items: Sequence[tuple[str | os.PathLike, int]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | str = 0,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Fit the temperature of a checkpoint on ``items`` and write it into its ``checkpoint.json``.

    The checkpoint's raw logits are used: calibrating again replaces the temperature.

    Args:
        checkpoint: the checkpoint folder (or a run folder: its best checkpoint).
        items: ``(image path, class index)`` pairs, the model's class indices.
        device, batch_size, num_workers, amp_dtype: how the model runs (see :func:`~finetune.evaluation.evaluate`).

    Returns:
        ``temperature``, ``ece_before``, ``ece_after``, ``loss_before``, ``loss_after`` and ``num_samples``.

    Raises:
        FinetuneError: no items, or none readable.
    """
    folder, logits, labels = _calibration_logits(checkpoint, items, device=device, batch_size=batch_size,
                                                 num_workers=num_workers, amp_dtype=amp_dtype)
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    set_temperature(folder, temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(labels, before),
        "ece_after": expected_calibration_error(labels, after),
        "loss_before": negative_log_likelihood(labels, before),
        "loss_after": negative_log_likelihood(labels, after),
        "num_samples": int(len(labels)),
    }


def set_temperature(checkpoint: str | os.PathLike, temperature: float) -> None:
    """Store ``temperature`` in a checkpoint's ``checkpoint.json`` (rewritten atomically)."""
    file = Path(resolve_checkpoint(checkpoint)) / META_FILE
    meta = read_meta(file.parent)  # checked as every load checks it
    meta["temperature"] = float(temperature)
    write_json_atomic(file, meta)


def calibrate_multilabel_checkpoint(
    checkpoint: str | os.PathLike,
    items: Sequence[tuple[str | os.PathLike, np.ndarray]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | str = 0,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Per-label temperature scaling of a multi-label checkpoint (:func:`fit_label_temperatures`) on ``items``
    (``(path, multi-hot target)``), stored in its ``checkpoint.json`` as ``temperatures``. Its thresholds move to
    the calibrated scale (:func:`rescale_thresholds`), so the labels it predicts do not change.

    Returns:
        ``temperatures``, ``ece_before``, ``ece_after`` (per-label binary ECE, averaged), ``loss_before``,
        ``loss_after`` (binary cross-entropy) and ``num_samples``.

    Raises:
        FinetuneError: no items, or none readable.
    """
    folder, logits, labels = _calibration_logits(checkpoint, items, device=device, batch_size=batch_size,
                                                 num_workers=num_workers, amp_dtype=amp_dtype)
    return set_label_temperatures(folder, logits, labels)


def set_label_temperatures(checkpoint: str | os.PathLike, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Fit per-label temperatures on a multi-label checkpoint's raw ``logits`` of images with multi-hot
    ``labels`` and store them in its ``checkpoint.json``, its thresholds moved to their scale; returns what
    :func:`calibrate_multilabel_checkpoint` returns. The end of a training run calls it with the validation
    logits it already has for the thresholds, so the split runs through the model once."""
    folder = resolve_checkpoint(checkpoint)
    temperatures = fit_label_temperatures(logits, labels)
    meta = read_meta(folder)
    previous = meta_temperatures(meta)
    thresholds = np.asarray(meta.get("thresholds") or [0.5] * len(meta["classes"]), dtype=np.float64)
    meta.update(temperatures=[float(t) for t in temperatures],
                thresholds=[float(t) for t in rescale_thresholds(thresholds, temperatures, previous)])
    write_json_atomic(folder / META_FILE, meta)
    return {"temperatures": meta["temperatures"], **label_calibration(labels, sigmoid(logits), sigmoid(logits, temperatures)),
            "num_samples": int(len(labels))}


def _calibration_logits(checkpoint, items, *, device, batch_size: int, num_workers, amp_dtype
                        ) -> tuple[Path, np.ndarray, np.ndarray]:
    """``(checkpoint folder, raw logits of the readable items, their targets)``: class indices, or multi-hot rows.

    Raises:
        FinetuneError: no items, or none readable.
    """
    if not items:
        raise FinetuneError("nothing to calibrate on: no images")
    folder = resolve_checkpoint(checkpoint)
    device = torch.device(device)
    model, meta = load_checkpoint(folder, map_location=device)
    targets = np.stack([np.asarray(t) for _, t in items]).astype(np.int64)
    indices, logits, _ = predict_probabilities(
        model, [str(p) for p, _ in items], eval_transform(meta["preprocessing"]), device=device,
        batch_size=batch_size, num_workers=num_workers, amp_dtype=amp_dtype, logits=True)
    if not len(indices):
        raise FinetuneError(f"none of the {len(items)} calibration images could be read")
    return folder, logits, targets[indices]
