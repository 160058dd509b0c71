"""The training loop: :func:`train_one_epoch` (the updates) and :func:`validate` (a validation pass;
`finetune.evaluation.evaluate` is the full evaluation with its report).

One code path for fp32, bf16 and fp16: ``autocast`` is a no-op when ``amp_dtype`` is None, and the
GradScaler is enabled only for fp16 (bf16 has fp32's range and needs no loss scaling).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from finetune import _distributed as ddp
from finetune._device import autocast, forward_batches
from finetune.errors import FinetuneError
from finetune.evaluation.metrics import classification_metrics
from finetune.evaluation.multilabel import multilabel_metrics

log = logging.getLogger("finetune")


def make_grad_scaler(device: torch.device, amp_dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def updates_per_epoch(n_batches: int, accumulation: int) -> int:
    """Optimizer updates in an epoch of ``n_batches`` micro-batches: a last partial window also steps."""
    return -(-n_batches // accumulation)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float
    skipped: int
    updates: int

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    *,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    scaler: torch.amp.GradScaler,
    accumulation: int = 1,
    clip_grad: Optional[float] = None,
    scheduler=None,
    first_update: int = 0,
    ema=None,
    channels_last: bool = False,
    where: str = "",
    progress: Optional[Callable[[int, int, float, float], None]] = None,
    on_update: Optional[Callable[[torch.Tensor, float], None]] = None,
    mix: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
) -> EpochStats:
    """Train ``model`` for one pass over ``loader`` (batches of ``(inputs, labels, skipped)``).

    Samples of unreadable files are skipped and counted; so is the one sample left of a batch that
    skipping shrank to one (BatchNorm cannot train on a batch of one).

    Every ``accumulation`` micro-batches make exactly one optimizer step, and so does a last partial
    window (with the mean gradient of its micro-batches): :func:`updates_per_epoch` updates. Gradients are
    unscaled before clipping, the scheduler steps per update (``scheduler.step_update(num_updates=...)``
    counting from ``first_update``), and ``ema.update()`` follows each update (the EMA knows what it tracks).
    ``on_update(loss, lr)`` gets each update's mean micro-batch loss (a device tensor: reading it is the
    caller's sync point) and the learning rate it used.

    ``mix(inputs, labels) -> (inputs, soft_targets)`` (Mixup/CutMix, :class:`~finetune.training.mixing.BatchMixer`)
    mixes each batch; ``loss_fn`` then gets class probabilities as targets, and training accuracy counts the
    predictions of each sample's dominant class (the largest entry of its target).

    Raises:
        FinetuneError: on a non-finite loss, naming ``where`` (stage and epoch) and the step.
    """
    start = time.perf_counter()
    n_batches = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    samples = skipped = 0
    updates = first_update
    optimizer.zero_grad(set_to_none=True)
    pending = False  # gradients accumulated since the last update
    window_loss = torch.zeros((), device=device)  # summed micro-batch losses of the pending update
    window_batches = 0
    distributed = hasattr(model, "no_sync")  # DDP: every rank must run every forward/backward (collectives)
    last_good = None  # DDP: the last batch this rank could read, for a batch it could not
    for step, (inputs, labels, batch_skipped) in enumerate(loader):
        boundary = (step + 1) % accumulation == 0 or step + 1 == n_batches
        if len(labels) == 1 and batch_skipped:
            # unreadable files left one sample, which BatchNorm cannot train on: skip it too
            labels, batch_skipped = labels[:0], batch_skipped + 1
        skipped += batch_skipped
        if distributed and not labels.numel():
            # This rank lost its whole batch to unreadable files while the others did not: skipping the step
            # would leave them waiting in the gradient all-reduce forever. Take part with a zero-weighted
            # pass over the last readable batch (its gradient is zero, so the update is the others').
            if last_good is None:
                raise FinetuneError(f"{where}: every image of this process's first batch is unreadable (step "
                                    f"{step}); under torchrun each process needs a readable batch to take part")
            with contextlib.nullcontext() if boundary else model.no_sync():
                with autocast(device, amp_dtype):
                    zero = model(last_good).float().sum() * 0.0
                scaler.scale(zero).backward()
            pending = True
        elif labels.numel():
            inputs = inputs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if channels_last and inputs.ndim == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            if distributed:
                last_good = inputs
            targets = labels
            if mix is not None:
                inputs, targets = mix(inputs, labels)
                # the dominant class, for the accuracy; multi-hot: the labels mixed in at half weight or more
                labels = targets.argmax(1) if labels.ndim == 1 else (targets >= 0.5).to(targets.dtype)
            window = min(accumulation, n_batches - step + step % accumulation)  # micro-batches in this update
            # DDP: only the micro-batch that ends an update all-reduces gradients
            sync = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    logits = model(inputs)
                    loss = loss_fn(logits.float(), targets)
                scaler.scale(loss / window).backward()
            # record the first non-finite step on the device; checked at the sync points below
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += loss.detach().double() * len(labels)
            if labels.ndim == 2:  # multi-hot targets: an image counts as right when every label is (subset accuracy)
                correct += ((logits > 0) == (labels > 0.5)).all(1).sum()
            else:
                correct += (logits.argmax(1) == labels).sum()
            samples += len(labels)
            pending = True
            if on_update is not None:
                window_loss += loss.detach().float()
                window_batches += 1
        if boundary and pending:  # a window whose last micro-batch was skipped still makes its update
            pending = False
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], clip_grad
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            if distributed:  # the ranks' BatchNorm statistics agree again before the EMA reads them
                ddp.average_buffers(model.module)
            if on_update is not None and window_batches:
                on_update(window_loss / window_batches, max(g["lr"] for g in optimizer.param_groups))
                window_loss, window_batches = torch.zeros((), device=device), 0
            if scheduler is not None:
                scheduler.step_update(num_updates=updates)
            if ema is not None:
                ema.update()
        if progress is not None and samples and (step % 10 == 0 or step + 1 == n_batches):
            _check_finite(first_bad, where)  # a CPU-GPU sync point, so only every 10 steps
            progress(step + 1, samples, loss.item(), max(g["lr"] for g in optimizer.param_groups))
    _check_finite(first_bad, where)
    return EpochStats(
        loss=(loss_sum / max(samples, 1)).item(),
        accuracy=correct.item() / max(samples, 1),
        samples=samples,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        updates=updates - first_update,
    )


def require_samples(split: str, samples: int, skipped: int, where: str) -> None:
    """Stop with one line when a pass over ``split`` read no image at all (its files vanished mid-run).

    Raises:
        FinetuneError: ``samples`` is 0, naming the split and ``where``; the last checkpoint is untouched.
    """
    if samples == 0:
        raise FinetuneError(f"no readable image left in the {split} split at {where} ({skipped} skipped); "
                            "stopped, the last checkpoint is kept")


def reduce_epoch(stats: EpochStats, dist: ddp.DistInfo, device: torch.device, where: str) -> list[float]:
    """Sum an epoch's training statistics over the ranks: ``[loss × samples, accuracy × samples, samples,
    skipped]``; warns about skipped images.

    Raises:
        FinetuneError: no rank trained on any image (see :func:`require_samples`).
    """
    totals = ddp.all_reduce_sum([stats.loss * stats.samples, stats.accuracy * stats.samples, stats.samples,
                                 stats.skipped], dist, device)
    if totals[3]:
        log.warning("%s: skipped %d unreadable image(s) (and survivors of batches they left at one)",
                    where, int(totals[3]))
    require_samples("train", int(totals[2]), int(totals[3]), where)
    return totals


def _check_finite(first_bad: torch.Tensor, where: str) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        raise FinetuneError(f"non-finite loss at {where}, step {bad + 1}; stopped, the last good checkpoint is kept")


def validate(model: nn.Module, loader: Iterable, *, device: torch.device, amp_dtype: Optional[torch.dtype],
             channels_last: bool, class_names: list[str], dist: ddp.DistInfo, where: str,
             task: str = "single") -> dict[str, Any]:
    """Validation metrics of ``model`` over ``loader``, gathered from every rank (each validates its shard);
    for multi-label data (``task: multilabel``) :func:`multilabel_validation` of the sigmoid probabilities.

    Raises:
        FinetuneError: no rank read any image (see :func:`require_samples`).
    """

    labels, probs, skipped = forward_batches(model, loader, device=device, amp_dtype=amp_dtype,
                                             channels_last=channels_last, softmax=task != "multilabel")
    parts = ddp.all_gather_objects((labels, probs, skipped), dist)
    skipped = sum(p[2] for p in parts)
    if skipped:
        log.warning("%s: validation skipped %d unreadable image(s)", where, skipped)
    require_samples("val", sum(len(p[0]) for p in parts), skipped, where)
    labels = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts if len(p[1])])
    if task == "multilabel":
        return multilabel_validation(labels, probs, class_names)
    return classification_metrics(labels, probs, class_names=class_names)


def multilabel_validation(targets: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Validation metrics of multi-label logits: :func:`~finetune.evaluation.multilabel.multilabel_metrics` at
    0.5 (``map`` = macro mAP, the default selection), the mean binary cross-entropy as ``loss``, and the keys
    every run logs under single-label names: ``accuracy`` (subset accuracy), ``macro_f1``,
    ``balanced_accuracy`` (the mean over labels of (recall + specificity) / 2) and ``per_class_recall``."""
    logits = logits.astype(np.float64)
    probs = 1 / (1 + np.exp(-logits))
    m = multilabel_metrics(targets, probs, class_names=class_names)
    # log(1 + e^-|x|) + max(x, 0) - x t: the stable BCE with logits
    bce = np.logaddexp(0, -np.abs(logits)) + np.maximum(logits, 0) - logits * targets
    rows = m["per_class"]
    balanced = [(r["tp"] / max(r["tp"] + r["fn"], 1) + r["tn"] / max(r["tn"] + r["fp"], 1)) / 2 for r in rows]
    return {**{k: v for k, v in m.items() if k != "per_class"}, "map": m["map_macro"], "loss": float(bce.mean()),
            "accuracy": m["subset_accuracy"], "macro_f1": m["f1_macro"], "balanced_accuracy": float(np.mean(balanced)),
            "per_class_recall": {r["class"]: r["recall"] for r in rows}, "per_class": rows}
