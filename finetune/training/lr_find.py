"""The learning-rate finder (Smith 2015; fastai's ``lr_find``): train one stage's trainable parameters for up
to ``num_updates`` updates while the learning rate grows exponentially from ``start_lr`` to ``end_lr``,
record the exponentially smoothed training loss, stop once it exceeds ``diverge`` × its minimum, and
suggest the learning rate where the smoothed loss falls fastest (the steepest negative slope against
log-lr, before the minimum).

The stage is built as training builds it (:class:`~finetune.training.runner.Runner`'s setup, the stage's
``freeze_stage``, ``stage_inputs`` and timm optimizer, layer decay included): a head-only stage sweeps on
cached backbone features (the backbone runs once per image, to fill the cache), other stages on augmented
images. The model is the recipe's initial one (pretrained backbone, new head); nothing is written but
``lr_find.json`` and ``lr_find.png`` in the output folder.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from finetune._device import autocast
from finetune._io import atomic_write_bytes, check_output, ensure_folder
from finetune.config import Recipe
from finetune.errors import FinetuneError
from finetune.evaluation.plots import figure_png
from finetune.models.params import freeze_stage, is_head_only, set_train_mode
from finetune.training.loaders import image_loader
from finetune.training.loop import make_grad_scaler
from finetune.training.optim import make_optimizer
from finetune.training.runner import Runner

log = logging.getLogger("finetune")


def lr_find(recipe: Recipe, resolved: dict[str, Any], *, stage: int, out_dir: str | Path, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_updates: int = 100, smoothing: float = 0.98, diverge: float = 4.0) -> dict[str, Any]:
    """Sweep the learning rate of stage ``stage`` of ``recipe`` and write ``lr_find.json`` and ``lr_find.png``
    into ``out_dir``.

    Args:
        recipe, resolved: the validated recipe and its dict.
        stage: the stage's index.
        out_dir: the output folder (created; other files in it are left alone).
        start_lr, end_lr: the sweep's range; the lr of update ``i`` is ``start_lr × (end_lr /
            start_lr) ** (i / (num_updates - 1))`` (per parameter group scaled by timm's layer-decay
            ``lr_scale``).
        num_updates: the sweep's length (fewer when the loss diverges first).
        smoothing: the loss's exponential moving average factor (bias-corrected).
        diverge: stop when the smoothed loss exceeds this multiple of its minimum.

    Returns:
        The contents of ``lr_find.json``: ``stage``, ``cached_features``, ``lrs``, ``losses``,
        ``smoothed``, ``suggested_lr``, ``min_loss_lr``, ``stopped`` (why the sweep ended).

    Raises:
        FinetuneError: a stage index out of range, a bad range, or an ``out_dir`` that cannot be written.
    """

    if not 0 <= stage < len(recipe.stages):
        raise FinetuneError(f"--stage must be 0..{len(recipe.stages) - 1} (the recipe has {len(recipe.stages)} "
                            f"stage(s)), got {stage}")
    if not 0 < start_lr < end_lr or num_updates < 2:
        raise FinetuneError(f"the sweep needs 0 < start_lr < end_lr and 2 or more updates, got {start_lr}, "
                            f"{end_lr}, {num_updates}")
    check_output(out_dir, folder=True)
    scratch = Path(tempfile.mkdtemp(prefix="finetune-lr-find-"))  # the runner's setup files; no run folder
    runner = Runner(recipe, resolved, run_dir=scratch / "run", resume=False, quiet=True)
    try:
        runner.setup()
        result = _sweep(runner, recipe.stages[stage], start_lr, end_lr, num_updates, smoothing, diverge)
    finally:
        runner.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"stage": stage, "stage_name": recipe.stages[stage].name or f"stage{stage}", **result}
    out = ensure_folder(out_dir)
    atomic_write_bytes(out / "lr_find.png", _plot(result))
    atomic_write_bytes(out / "lr_find.json", (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def _sweep(runner, stage, start_lr: float, end_lr: float, num_updates: int, smoothing: float,
           diverge: float) -> dict[str, Any]:
    model, cfg, data = runner.model, runner.cfg, runner.recipe.data
    trainable, frozen_bn = freeze_stage(model, stage.train, stage.batchnorm)

    def loader(split: str, *, train: bool):
        return image_loader(runner.dataset(split, train=train), train=train, balance=data.balance == "sampler", seed=cfg.seed,
                            batch_size=runner.train_batch, num_workers=data.num_workers, dist=runner.dist,
                            device=runner.device)

    inputs = runner.stage_inputs(stage, is_head_only(trainable), loader, eval_model=model)
    cached = inputs.module is not model
    optimizer = make_optimizer(model, stage.optimizer)
    scaler = make_grad_scaler(runner.device, runner.amp_dtype)
    set_train_mode(model, frozen_bn)
    lrs, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, "swept the whole range"
    batches = (batch for epoch in itertools.count() for batch in _epoch(inputs, epoch))
    for i in range(num_updates):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_updates - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        images, labels = next(batches)
        images, labels = images.to(runner.device), labels.to(runner.device)
        if inputs.mix is not None:  # the stage's Mixup/CutMix: sweep on the batches it will train on
            images, labels = inputs.mix(images, labels)
        with autocast(runner.device, runner.amp_dtype):
            loss = runner.loss_fn(inputs.module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = float(loss.detach())
        average = smoothing * average + (1 - smoothing) * value
        smooth = average / (1 - smoothing ** (i + 1))
        lrs.append(lr), losses.append(value), smoothed.append(smooth)
        if not math.isfinite(smooth) or smooth > diverge * best:
            stopped = f"the smoothed loss exceeded {diverge:g}x its minimum at lr {lr:.3g}"
            break
        best = min(best, smooth)
    log.info("lr-find: %d updates (%s)", len(lrs), stopped)
    suggested, at_min = suggest(lrs, smoothed)
    return {"cached_features": cached, "start_lr": start_lr, "end_lr": end_lr, "num_updates": len(lrs),
            "stopped": stopped, "suggested_lr": suggested, "min_loss_lr": at_min, "lrs": lrs, "losses": losses,
            "smoothed": smoothed}


def _epoch(inputs, epoch: int):
    """The non-empty ``(inputs, labels)`` training batches of one epoch (reshuffled per epoch)."""
    inputs.set_epoch(epoch)
    for images, labels, _ in inputs.train_loader:
        if labels.numel() > 1:
            yield images, labels


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """``(suggested, min_loss_lr)``: the lr where the smoothed loss falls fastest against log-lr, among the
    updates up to its minimum (ignoring the first tenth, where the moving average is still warming up), and
    the lr at the minimum."""
    losses = np.asarray(smoothed, dtype=np.float64)
    finite = np.isfinite(losses)
    at_min = int(np.argmin(np.where(finite, losses, np.inf)))
    if at_min < 2:
        return float(lrs[at_min]), float(lrs[at_min])
    log_lr = np.log10(np.asarray(lrs[: at_min + 1]))
    slope = np.gradient(losses[: at_min + 1], log_lr)
    start = min(len(lrs) // 10, at_min - 1)
    steepest = start + int(np.argmin(slope[start:]))
    return float(lrs[steepest]), float(lrs[at_min])


def _plot(result: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(result["lrs"], result["losses"], color="lightgrey", lw=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    ax.axvline(result["suggested_lr"], color="tab:red", ls="--", label=f"suggested {result['suggested_lr']:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title=f"LR finder: stage {result['stage']} ({result['stage_name']})")
    top = max(result["smoothed"][0], min(result["smoothed"])) * 1.5
    ax.set_ylim(min(result["smoothed"]) * 0.9, top)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return figure_png(fig, dpi=100)
