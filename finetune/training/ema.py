"""An exponential moving average of the model's weights that lives across the stages of a run.

One EMA for the whole run, never restarted: a single update count drives timm's decay (``ModelEmaV3``:
its first update copies the model, every later one blends at ``decay``), and it carries from stage to
stage and through a resume. Each stage averages only what it changes — the parameters it trains and the
running statistics of the BatchNorm layers that train in the part that runs (in a stage on cached features,
the head alone). Frozen weights keep their EMA value: after a head-only stage the EMA backbone is the one
the stage began with (the model's own backbone when the head stage comes first), and an update costs a
pass over what trains, not over the whole model.
"""
from __future__ import annotations

from typing import Iterable

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class Ema:
    """The EMA of ``model`` (timm's ``ModelEmaV3`` holds the copy and the decay rule).

    Args:
        model: the model to average; tracked whole until :meth:`track` narrows it.
        decay: the EMA decay per update.
        warmup: ramp the decay up from 0 with the update count (timm's ``use_warmup``), capped at ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):

        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
        self.updates = 0
        self.track(model, model.state_dict().keys())

    @property
    def module(self) -> nn.Module:
        """The averaged model (in eval mode)."""
        return self._ema.module

    def track(self, model: nn.Module, names: Iterable[str]) -> None:
        """From now on, each update averages the state-dict entries ``names`` of ``model`` (floating
        point ones; others, like BatchNorm's batch counter, are copied) and leaves every other entry."""
        ema_state, model_state = self.module.state_dict(), model.state_dict()
        names = set(names)
        pairs = [(ema_state[n], model_state[n]) for n in model_state if n in names]
        self._lerp = [pair for pair in pairs if pair[0].is_floating_point()]
        self._copy = [pair for pair in pairs if not pair[0].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Blend the tracked entries after one optimizer update."""
        self.updates += 1
        weight = 1.0 - self._ema.get_decay(self.updates)
        if self._lerp:
            torch._foreach_lerp_([e for e, _ in self._lerp], [m for _, m in self._lerp], weight)
        for ema_value, model_value in self._copy:
            ema_value.copy_(model_value)


def stage_state_names(model: nn.Module, trainable: set[str], frozen_bn: list[nn.Module],
                      runs: nn.Module) -> list[str]:
    """The state-dict entries of ``model`` a stage changes: its ``trainable`` parameters and the buffers
    of BatchNorm layers not in ``frozen_bn``, within ``runs`` (the part of the model the stage runs:
    the model itself, or its head when the stage trains on cached features)."""
    prefix = next(name for name, module in model.named_modules() if module is runs)
    prefix = f"{prefix}." if prefix else ""
    frozen = {id(m) for m in frozen_bn}
    names = [n for n in trainable if n.startswith(prefix)]
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and id(module) not in frozen and f"{name}.".startswith(prefix):
            names.extend(f"{name}.{b}" for b, value in module.named_buffers(recurse=False) if value is not None)
    return names
