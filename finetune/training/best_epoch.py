"""Model selection: the run's best epoch (which becomes ``checkpoints/best``) and early stopping.

The best is the run's; patience counts epochs without improvement on the *stage's* best, so a stage that
starts below an earlier stage's best (as unfreezing does) gets its full patience.
"""
from __future__ import annotations

from typing import Any, Optional

from finetune.training.state import RunState


def is_better(value: float, best: Optional[float], metric: str) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing to beat); lower is better for loss."""
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def record(state: RunState, val: dict[str, Any], metric: str, *, epoch: int, stage: int) -> bool:
    """Update the run's best and the stage's patience with one epoch's validation metrics.

    Args:
        state: the run's progress (``best``, ``stage_best`` and ``stale_epochs`` change).
        val: the epoch's validation metrics.
        metric: the selection metric (``training.select``).
        epoch: the epoch's number in the run (1-based).
        stage: the stage's index.

    Returns:
        Whether the epoch is the run's new best.
    """
    value = float(val[metric])
    improved = is_better(value, state.best["value"] if state.best else None, metric)
    if improved:
        state.best = {"epoch": epoch, "stage": stage, "metric": metric, "value": value, "val": json_metrics(val)}
    if is_better(value, state.stage_best, metric):
        state.stage_best, state.stale_epochs = value, 0
    else:
        state.stale_epochs += 1
    return improved


def early_stopped(state: RunState, patience: Optional[int]) -> bool:
    """Whether the stage has gone ``patience`` epochs without improving on its own best."""
    return patience is not None and state.stale_epochs >= patience


def json_metrics(val: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (what ``summary.json`` and the checkpoint's metadata keep)."""
    return {k: v for k, v in val.items() if isinstance(v, (int, float, str))}
