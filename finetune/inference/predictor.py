"""Predictions from a checkpoint alone: ``predictor = finetune.load(CHECKPOINT)``.

A :class:`Predictor` holds the model and the checkpoint's class names and preprocessing, and turns image
files, PIL images or RGB arrays into top-k labels with probabilities::

    predictor = finetune.load("runs/birds/checkpoints/best")
    pred = predictor.predict("robin.jpg", topk=3)
    pred.label, pred.probability      # the most probable class
    pred.labels, pred.probabilities   # the top 3
    predictor.predict("robin.jpg", tta="hflip")   # averaged over the image and its mirror image

A calibrated checkpoint's temperature (:mod:`finetune.inference.temperature`) divides the logits before the softmax;
test-time augmentation (:mod:`finetune.inference.tta`) averages the probabilities over views of each image.

Loading reads ``checkpoint.json`` and the weights (``model.safetensors``, and ``frozen.safetensors`` where split) only: no recipe, no training data, no network
and no pickled code. :func:`predict_probabilities` (shared with evaluation) batches images with the one
collate and runs :func:`finetune._device.forward_batches`, the forward pass validation and feature
extraction use too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from finetune._device import forward_batches, resolve_device
from finetune._workers import inference_workers
from finetune.data import ImageDecodeError, load_image, one_pass_loader, preprocessing_transform
from finetune.data.device_decode import device_decoding
from finetune.data.transforms import normalizer_of
from finetune.errors import FinetuneError
from finetune.inference.temperature import meta_temperature, meta_temperatures, scaled, sigmoid
from finetune.inference.tta import VIEWS, TtaModel, TtaTransform
from finetune.models.checkpoint import load_checkpoint

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image.

    Attributes:
        labels: class names, most probable first (empty when the image could not be read).
        probabilities: their probabilities.
        path: the image file, or ``None`` for an in-memory image.
        error: why the image could not be read, else ``None``.
    """

    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    path: str | None = None
    error: str | None = None

    @property
    def label(self) -> str | None:
        """The most probable class (``None`` for an unreadable image)."""
        return self.labels[0] if self.labels else None

    @property
    def probability(self) -> float | None:
        """The probability of :attr:`label`."""
        return self.probabilities[0] if self.probabilities else None


class Predictor:
    """A model with its class names and preprocessing, ready to classify images.

    Args:
        model: the network (images → logits); put in eval mode and moved to ``device``.
        classes: class names in index order.
        preprocessing: the checkpoint's preprocessing (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, optional ``eval_transforms``).
        device: where the model runs.
        temperature: the checkpoint's calibration temperature (:mod:`finetune.inference.temperature`): logits are
            divided by it before the softmax.
        thresholds: a multi-label checkpoint's per-label thresholds (tuned on validation at the end of training):
            the model's outputs are then per-label sigmoid probabilities, and an image's labels are those at or
            above their thresholds.
        temperatures: a calibrated multi-label checkpoint's per-label temperatures (``finetune calibrate``): each
            logit is divided by its label's before the sigmoid.

    Attributes:
        model: the ``nn.Module``.
        classes: class names in index order.
        preprocessing: as given.
        transform: the eval pipeline, ``transform(image=uint8_rgb_array)["image"]`` → 3×H×W tensor.
        device: the ``torch.device``.
        temperature, thresholds, temperatures: as given (arrays, or None).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        classes: Sequence[str],
        preprocessing: Mapping[str, Any],
        device: str | torch.device = "cpu",
        temperature: float = 1.0,
        thresholds: Sequence[float] | None = None,
        temperatures: Sequence[float] | None = None,
    ):
        self.temperatures = None if temperatures is None else np.asarray(temperatures, dtype=np.float64)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        if self.thresholds is not None and len(self.thresholds) != len(classes):
            raise FinetuneError(f"{len(self.thresholds)} thresholds for {len(classes)} classes")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.temperature = float(temperature)
        self.classes = list(classes)
        self.preprocessing = dict(preprocessing)
        self.transform = eval_transform(self.preprocessing)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
        """Load a checkpoint folder (or a run folder, whose best checkpoint is used)."""

        device = resolve_device(device)
        model, meta = load_checkpoint(path, map_location=device)
        thresholds = meta.get("thresholds") if meta.get("task") == "multilabel" else None
        if meta.get("task") == "multilabel" and thresholds is None:
            thresholds = [0.5] * len(meta["classes"])
        return cls(model, classes=meta["classes"], preprocessing=meta["preprocessing"], device=device,
                   temperature=meta_temperature(meta), thresholds=thresholds, temperatures=meta_temperatures(meta))

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        *,
        topk: int = 1,
        batch_size: int = 32,
        num_workers: int | str = 0,
        tta: str | None = None,
        threshold: float | None = None,
    ) -> Prediction | list[Prediction]:
        """Classify one image or a list of images.

        Args:
            images: an image file path, a PIL image, an H×W×3 (or H×W) uint8 RGB array, or a list of
                these (an N×H×W×3 array counts as a list).
            topk: how many classes to return per image (at most the number of classes).
            batch_size: images per forward pass.
            num_workers: DataLoader workers decoding files in parallel, or ``"auto"`` (the CPU cores, at
                most 8; what ``finetune predict`` uses).
            tta: a test-time augmentation mode of :data:`finetune.inference.tta.TTA_MODES`: the probabilities are
                the mean over its views (a forward pass then holds the views of ``batch_size // views``
                images).
            threshold: for a multi-label model, one threshold for every label instead of the tuned ones.

        Returns:
            A :class:`Prediction` for a single image, else a list of them in input order. A file that
            cannot be read gives a prediction with ``error`` set instead of raising.
        """
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        )
        sources = [images] if single else list(images)
        if topk < 1:
            raise FinetuneError(f"topk must be at least 1, got {topk}")
        k = min(topk, len(self.classes))
        if self.thresholds is not None:
            return self._predict_labels(sources, single, batch_size=batch_size, num_workers=num_workers,
                                        threshold=threshold)
        model = scaled(self.model, self.temperature)
        if tta:  # a forward pass over batch_size inputs: the views of batch_size // views images
            model, transform = TtaModel(model), TtaTransform(self.transform, tta)
            batch_size = max(1, batch_size // VIEWS[tta])
        else:
            transform = self.transform
        indices, probs, errors = predict_probabilities(
            model, sources, transform, device=self.device, batch_size=batch_size, num_workers=num_workers
        )
        results = [Prediction(path=_path_of(s), error=errors.get(i)) for i, s in enumerate(sources)]
        top = topk_indices(probs, k)
        for row, i in enumerate(indices):
            results[i] = Prediction(
                labels=[self.classes[c] for c in top[row]],
                probabilities=[float(probs[row, c]) for c in top[row]],
                path=results[i].path,
            )
        return results[0] if single else results

    def _predict_labels(self, sources, single: bool, *, batch_size: int, num_workers, threshold: float | None):
        """Multi-label: every label whose sigmoid probability reaches its threshold, most probable first."""
        indices, logits, errors = predict_probabilities(
            self.model, sources, self.transform, device=self.device, batch_size=batch_size, num_workers=num_workers,
            logits=True)
        probs = sigmoid(logits, self.temperatures)
        cut = self.thresholds if threshold is None else np.full(len(self.classes), float(threshold))
        results = [Prediction(path=_path_of(s), error=errors.get(i)) for i, s in enumerate(sources)]
        for row, i in enumerate(indices):
            chosen = [c for c in np.argsort(-probs[row], kind="stable") if probs[row, c] >= cut[c]]
            results[i] = Prediction(labels=[self.classes[c] for c in chosen],
                                    probabilities=[float(probs[row, c]) for c in chosen], path=results[i].path)
        return results[0] if single else results


def topk_indices(probs: np.ndarray, k: int, *, block: int = 1 << 20) -> np.ndarray:
    """The indices of the ``min(k, C)`` largest values of each row of ``probs`` (shape ``(N, C)``), largest
    first, ties in class-index order: what a stable descending argsort gives, without sorting all ``C``
    columns or copying the matrix. Rows go in blocks of about ``block`` values (a partial sort, then the
    ``k`` picked sorted); only rows with a tie across the k-th place are sorted in full, to keep ties in
    index order.

    Returns:
        An int64 ``(N, min(k, C))`` array.
    """
    probs = np.asarray(probs)
    rows, num_classes = probs.shape
    k = min(k, num_classes)
    top = np.empty((rows, k), dtype=np.int64)
    step = max(1, block // max(num_classes, 1))
    for start in range(0, rows, step):
        top[start:start + step] = _topk_block(probs[start:start + step], k)
    return top


def _topk_block(probs: np.ndarray, k: int) -> np.ndarray:
    num_classes = probs.shape[1]
    if k < num_classes:
        picked = np.argpartition(probs, num_classes - k, axis=1)[:, num_classes - k:]
    else:
        picked = np.broadcast_to(np.arange(num_classes), probs.shape)
    values = np.take_along_axis(probs, picked, axis=1)
    order = np.lexsort((picked, -values), axis=1)  # by value (descending), then by class index
    top = np.take_along_axis(picked, order, axis=1)
    if k < num_classes:
        kth = np.take_along_axis(values, order[:, -1:], axis=1)
        tied = np.flatnonzero((probs >= kth).sum(axis=1) > k)
        if len(tied):  # which tied classes argpartition kept is arbitrary: the lowest indices win
            top[tied] = np.argsort(-probs[tied], axis=1, kind="stable")[:, :k]
    return top


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """Load a checkpoint folder (or a run folder) as a :class:`Predictor`; ``device="auto"`` picks CUDA
    when available."""
    return Predictor.from_checkpoint(path, device=device)


def eval_transform(preprocessing: Mapping[str, Any]) -> Callable:
    """The eval pipeline a checkpoint's ``preprocessing`` describes: uint8 out, each batch normalised where
    the model runs (:func:`~finetune.data.transforms.normalizer_of`)."""

    return preprocessing_transform(preprocessing, device_normalize=True)


def predict_probabilities(
    model: nn.Module,
    sources: Sequence[ImageSource],
    transform: Callable,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | str = 0,
    amp_dtype: torch.dtype | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    logits: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Softmax probabilities of ``model`` for every readable image of ``sources``, in batches.

    Args:
        model: images → logits, already on ``device`` and in eval mode.
        sources: image file paths, PIL images or uint8 RGB arrays.
        transform: the eval pipeline (:func:`eval_transform`).
        device: where the model runs.
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images, or ``"auto"`` (the CPU cores, at most 8); at
            most one per batch, none for a single batch.
        amp_dtype: autocast dtype (``torch.bfloat16``/``torch.float16``), or ``None`` for full precision.
        progress: wraps the batch iterator, e.g. ``tqdm``.
        logits: return the model's raw outputs instead of their softmax.

    Returns:
        ``(indices, probabilities, errors)``: the positions in ``sources`` of the images read (ascending),
        their ``float32`` probabilities (``len(indices)×C``), and position → reason for those that could
        not be read.
    """

    device = torch.device(device)
    workers = inference_workers(num_workers, len(sources), batch_size)
    loader = device_decoding([(s, i) for i, s in enumerate(sources)], transform, device=device,
                             batch_size=batch_size, num_workers=workers)  # JPEG batches decoded on CUDA
    if loader is None:
        loader = one_pass_loader(_SourceDataset(sources, transform), batch_size=batch_size, num_workers=workers,
                                 device=device, normalize=normalizer_of(transform))
    indices, probs, _ = forward_batches(model, loader, device=device, amp_dtype=amp_dtype, progress=progress,
                                       softmax=not logits)
    unread = sorted(set(range(len(sources))) - set(indices.tolist()))
    return indices, probs, {i: _unreadable_reason(sources[i]) for i in unread}


class _SourceDataset(Dataset):
    """``(tensor, index)`` for a readable image, ``None`` for one that is not (:func:`collate_skip` drops it)."""

    def __init__(self, sources: Sequence[ImageSource], transform: Callable):
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):

        try:
            image = _to_array(self.sources[index])
        except ImageDecodeError:
            return None
        return self.transform(image=image)["image"], index


def _unreadable_reason(source: ImageSource) -> str:
    """Why ``source`` could not be read: decoding it again (only the failures) gives the reason."""

    try:
        _to_array(source)
    except ImageDecodeError as e:
        return e.reason
    return "could not be read while predicting"


def _to_array(source: ImageSource) -> np.ndarray:

    if isinstance(source, (str, os.PathLike)):
        return load_image(source)
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    if isinstance(source, np.ndarray):
        if source.ndim == 2:
            source = np.repeat(source[:, :, None], 3, axis=2)
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise FinetuneError(f"an image array must be H×W×3 (or H×W) uint8 RGB, got {source.shape} {source.dtype}")
        return np.ascontiguousarray(source)
    raise FinetuneError(f"cannot read an image from a {type(source).__name__}: give a path, a PIL image or an array")


def _path_of(source: ImageSource) -> str | None:
    return str(Path(source)) if isinstance(source, (str, os.PathLike)) else None
