"""Run progress: what ``checkpoints/last/training_state.pt`` holds and an exact resume restores.

:class:`RunState` is where the run is (stage, epoch, optimizer updates), what selection has seen (the run's
best, the stage's best, epochs without improvement) and the logs so far. :func:`state_dict` adds the
optimizer, GradScaler, EMA and RNG states; :func:`load_state_dict` puts them back. The file's keys are
those of every earlier version, so a checkpoint written before this module existed still resumes.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class RunState:
    stage_index: int = 0
    epoch_in_stage: int = 0
    updates_in_stage: int = 0
    best: Optional[dict[str, Any]] = None  # of the run: picks checkpoints/best
    stage_best: Optional[float] = None  # of the current stage: early stopping's patience counts against it
    stale_epochs: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv rows
    recall_history: list[dict[str, Any]] = field(default_factory=list)  # per_class_recall.csv rows

    @property
    def updates(self) -> int:
        """Optimizer updates of the run so far (the experiment loggers' step count)."""
        return sum(row.get("updates", 0) for row in self.history)

    def enter_stage(self, index: int) -> None:
        """Start stage ``index`` afresh: epoch 0, no updates, patience reset."""
        self.stage_index, self.epoch_in_stage, self.updates_in_stage = index, 0, 0
        self.stage_best, self.stale_epochs = None, 0


def state_dict(state: RunState, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema,
               model: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Everything an exact resume needs, in the training-state file's format. The EMA's entries equal to
    ``model``'s (a frozen backbone the EMA never averaged) are not written again: ``ema_shared`` names them,
    and :func:`load_state_dict` takes them from the model, whose weights the checkpoint holds."""
    ema_state, shared = ema_delta(ema, model) if ema is not None else (None, [])
    return {
        "stage_index": state.stage_index,
        "epoch_in_stage": state.epoch_in_stage,
        "updates_in_stage": state.updates_in_stage,
        "stale_epochs": state.stale_epochs,
        "stage_best": state.stage_best,
        "train_seconds": state.train_seconds,
        "best": json.dumps(state.best),
        "history": json.dumps(state.history),
        "recall_history": json.dumps(state.recall_history),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema_state,
        "ema_shared": shared,
        "ema_updates": ema.updates if ema is not None else 0,
        "rng": rng_state(),
    }


def ema_delta(ema, model: Optional[torch.nn.Module]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The EMA's state-dict entries that differ from ``model``'s, and the names of those equal to them."""
    ema_state = ema.module.state_dict()
    model_state = model.state_dict() if model is not None else {}
    shared = [k for k, v in ema_state.items() if k in model_state and model_state[k].shape == v.shape
              and model_state[k].dtype == v.dtype and torch.equal(model_state[k], v)]
    same = set(shared)
    return {k: v for k, v in ema_state.items() if k not in same}, shared


def load_state_dict(saved: dict[str, Any], scaler: torch.amp.GradScaler, ema,
                    model: Optional[torch.nn.Module] = None) -> tuple[RunState, dict[str, Any]]:
    """Restore the GradScaler, the EMA and the RNGs from a training state (``model``, its weights already
    loaded, gives the EMA's entries the state shares with it).

    Returns:
        The run's progress, and the optimizer state (for the optimizer the stage builds).
    """
    state = RunState(
        stage_index=saved["stage_index"], epoch_in_stage=saved["epoch_in_stage"],
        updates_in_stage=saved["updates_in_stage"], stale_epochs=saved["stale_epochs"],
        stage_best=saved.get("stage_best"), train_seconds=saved["train_seconds"], best=json.loads(saved["best"]),
        history=json.loads(saved["history"]), recall_history=json.loads(saved["recall_history"]),
    )
    if ema is not None and saved["ema"] is not None:
        model_state = model.state_dict() if model is not None else {}
        ema.module.load_state_dict({**{k: model_state[k] for k in saved.get("ema_shared", [])}, **saved["ema"]})
        ema.updates = saved.get("ema_updates", 0)
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    return state, saved["optimizer"]


def serialize(state: dict[str, Any]) -> bytes:
    """``torch.save`` into memory: the file is then written by Python, so a full disk raises OSError (which
    the checkpoint writer reports in one line) rather than torch's RuntimeError."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. Every rank takes the same seed: identical initial weights (DDP
    broadcasts them anyway, but the feature cache runs the backbone before any DDP wrapper exists)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
