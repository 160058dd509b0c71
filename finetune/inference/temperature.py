"""Temperature scaling (Guo et al., 2017): one scalar ``T`` fitted on validation logits, dividing every
logit afterwards. It leaves each prediction's class (the argmax) as it was and makes the probabilities
honest: an over-confident network gets ``T > 1``.

A checkpoint holds its temperature in ``checkpoint.json`` (``"temperature"``, absent means 1);
:func:`finetune.load` (the Predictor), ``finetune predict``, ``finetune eval`` and the ONNX/TorchScript
exports apply it (:class:`TemperatureScaled`). Fitting on a checkpoint lives in
:mod:`finetune.evaluation.calibrate`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError


class TemperatureScaled(nn.Module):
    """``model``'s logits divided by ``temperature`` (one, or one per output: a multi-label model's)."""

    def __init__(self, model: nn.Module, temperature: float | np.ndarray | list):
        super().__init__()
        self.model = model
        if np.ndim(temperature):
            self.register_buffer("temperature", torch.as_tensor(np.asarray(temperature), dtype=torch.float32))
        else:
            self.temperature = float(temperature)
        self.train(model.training)  # a wrapper in train mode would put model back in train mode after eval

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) / self.temperature


class LabelProbabilities(nn.Module):
    """A multi-label ``model``'s per-label probabilities, ``sigmoid(logits / T)`` (``T`` one per label, or none):
    what a multi-label export outputs, so a deployment only compares them with the thresholds."""

    def __init__(self, model: nn.Module, temperatures: np.ndarray | list | None = None):
        super().__init__()
        self.model = model if temperatures is None else TemperatureScaled(model, temperatures)
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images))


def scaled(model: nn.Module, temperature: float) -> nn.Module:
    """``model`` with its logits divided by ``temperature`` (``model`` itself when it is 1)."""
    return model if temperature == 1.0 else TemperatureScaled(model, temperature)


def meta_temperature(meta: Mapping[str, Any]) -> float:
    """The temperature a checkpoint's metadata holds (1 when none).

    Raises:
        FinetuneError: a temperature that is not a positive finite number.
    """
    value = meta.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FinetuneError(f"checkpoint temperature must be a positive number, got {value!r}")
    return float(value)


def meta_temperatures(meta: Mapping[str, Any]) -> np.ndarray | None:
    """A multi-label checkpoint's per-label temperatures (``"temperatures"`` in its metadata), or None.

    Raises:
        FinetuneError: not one positive finite number per label.
    """
    values = meta.get("temperatures")
    if values is None:
        return None
    array = np.asarray(values, dtype=object)
    if (array.ndim != 1 or len(array) != len(meta.get("classes", ())) or
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in array)):
        raise FinetuneError(f"checkpoint temperatures must be one positive number per label, got {values!r}")
    return array.astype(np.float64)


def fit_label_temperatures(logits: np.ndarray, targets: np.ndarray, *, max_iter: int = 100) -> np.ndarray:
    """Per-label temperature scaling of a multi-label model: for each label, the ``T`` minimising the binary
    cross-entropy of ``sigmoid(logit / T)`` on its column, fitted jointly with LBFGS on ``log T``.

    Raises:
        FinetuneError: no samples, or shapes that do not match.
    """
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    if logits_t.ndim != 2 or logits_t.shape != targets_t.shape or len(logits_t) == 0:
        raise FinetuneError(f"temperature fitting needs (N, C) logits and N x C targets, N > 0; got "
                            f"{tuple(logits_t.shape)} and {tuple(targets_t.shape)}")
    log_t = torch.zeros(logits_t.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # the columns are independent: the summed loss's gradient in log_t[c] is column c's alone
        loss = nn.functional.binary_cross_entropy_with_logits(logits_t / log_t.exp(), targets_t, reduction="sum")
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.detach().exp().clamp(1e-2, 1e2).numpy()


def sigmoid(logits: np.ndarray, temperatures: np.ndarray | None = None) -> np.ndarray:
    """Element-wise ``sigmoid(logits / T)`` in float64 (``T`` one per column, or 1)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperatures is not None:
        z = z / np.asarray(temperatures, dtype=np.float64)
    return 1 / (1 + np.exp(-z))


def rescale_thresholds(thresholds: np.ndarray, temperatures: np.ndarray, previous: np.ndarray | None = None
                       ) -> np.ndarray:
    """The probability thresholds on ``sigmoid(logit / T)`` that select exactly what ``thresholds`` selected
    on ``sigmoid(logit / T_previous)`` (default ``T_previous`` = 1): the same logit cut, read on the new scale."""
    p = np.clip(np.asarray(thresholds, dtype=np.float64), 1e-12, 1 - 1e-12)
    cut = np.log(p / (1 - p)) * (1.0 if previous is None else np.asarray(previous, dtype=np.float64))
    return sigmoid(cut, temperatures)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature minimising the negative log-likelihood of ``softmax(logits / T)``, fitted with LBFGS
    on ``log T`` (so ``T`` stays positive), starting from ``T = 1``.

    Args:
        logits: float array ``(N, C)``.
        labels: true class indices ``(N,)``.
        max_iter: LBFGS iterations.

    Raises:
        FinetuneError: no samples, or shapes that do not match.
    """
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if logits_t.ndim != 2 or len(logits_t) != len(labels_t) or len(labels_t) == 0:
        raise FinetuneError(f"temperature fitting needs (N, C) logits and N labels, N > 0; got "
                            f"{tuple(logits_t.shape)} and {tuple(labels_t.shape)}")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1e-2, 1e2))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
