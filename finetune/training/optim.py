"""What a stage optimizes with: timm's optimizer and scheduler factories, and the loss."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from timm.loss import AsymmetricLossMultiLabel, BinaryCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from finetune.errors import FinetuneError
from finetune.data import class_counts
from finetune.data import class_weights as weights_for


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """timm's optimizer factory over the trainable parameters, with layer-wise lr decay when asked.

    Args:
        model: the model; its parameters with ``requires_grad`` are optimized.
        cfg: a stage's ``optimizer`` section (name, lr, weight_decay, momentum, layer_decay).
    """

    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, layer_decay=cfg.layer_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, epochs: int, updates_per_epoch: int):
    """timm's scheduler factory, stepped per update (so warmup is smooth): cosine, step or constant.

    Args:
        optimizer: the stage's optimizer.
        cfg: a stage's ``schedule`` section.
        epochs: the stage's epochs.
        updates_per_epoch: optimizer updates per epoch.
    """

    name = {"cosine": "cosine", "step": "step", "constant": "step"}[cfg.name]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs, decay_epochs=cfg.step_epochs,
        decay_rate=1.0 if cfg.name == "constant" else cfg.gamma, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=max(updates_per_epoch, 1),
    )
    return scheduler


def stage_optimizer(model: nn.Module, stage, *, updates_per_epoch: int, first_update: int = 0,
                    resume_state: Optional[dict] = None):
    """The optimizer and per-update scheduler of a stage, at update ``first_update`` (a resumed stage also
    gets its saved optimizer state back).

    Returns:
        ``(optimizer, scheduler)``.
    """
    optimizer = make_optimizer(model, stage.optimizer)
    scheduler = make_scheduler(optimizer, stage.schedule, stage.epochs, updates_per_epoch)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state)
    # after loading the state, whose lr is that of the stage's old length when a resume grew its epochs
    scheduler.step_update(num_updates=first_update)
    return optimizer, scheduler


def make_loss(*, label_smoothing: float, class_weights: Optional[str] = None, labels: Sequence[int] = (),
              num_classes: int = 0, device: Optional[torch.device] = None, task: str = "single",
              loss: str = "auto") -> nn.Module:
    """Cross-entropy with label smoothing; with ``class_weights`` (``data.balance: loss``), each class
    weighted by its frequency among the training ``labels`` (see :func:`~finetune.data.class_weights`).

    Multi-label (``task: multilabel``; ``loss`` ``auto`` or ``bce``): timm's ``BinaryCrossEntropy`` on the
    multi-hot targets, smoothing each target towards 0.5 as timm does for dense targets; with ``class_weights``,
    each label's positives weighted by its negatives / positives among the training ``labels`` (multi-hot rows).
    ``loss: asl``: timm's ``AsymmetricLossMultiLabel`` (Ridnik et al. 2021; gamma 4 / 1, clip 0.05)."""
    if task == "multilabel":
        if loss == "ce":
            raise FinetuneError("training.loss: ce is single-label; multi-label data trains with bce or asl")
        if loss == "asl":
            return AsymmetricLossMultiLabel(smoothing=label_smoothing)
        pos_weight = None
        if class_weights is not None:
            y = np.asarray(labels, dtype=np.float64)
            positives = y.sum(0)
            pos_weight = torch.tensor((len(y) - positives) / np.maximum(positives, 1), dtype=torch.float32).to(device)
        return BinaryCrossEntropy(smoothing=label_smoothing, smooth_dense=True, pos_weight=pos_weight)
    if loss in ("bce", "asl"):
        raise FinetuneError(f"training.loss: {loss} is for multi-label data; single-label data trains with ce")
    weight = None
    if class_weights is not None:

        weight = weights_for(class_counts(labels, num_classes), mode=class_weights).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
