"""Staged freezing: which parameters a stage trains, and BatchNorm statistics of the frozen parts.

A stage's ``train`` selection is data: ``"head"``, ``"last:N"`` (the head plus the backbone's last N
stages from timm's ``group_matcher``), ``"all"``, or regexes searched in parameter names (``backbone.``
or ``head.`` prefixed); a list takes the union.
"""
from __future__ import annotations

import re
from typing import Iterable, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import FinetuneError

Selection = Union[str, Iterable[str]]


def select_trainable(model: nn.Module, train: Selection) -> set[str]:
    """The names of the parameters ``train`` selects in a :class:`~finetune.models.FinetuneModel`.

    Raises:
        FinetuneError: when an item selects nothing (a regex matching no parameter, ``last:N`` with N
            larger than the number of backbone stages).
    """
    names = [n for n, _ in model.named_parameters()]
    items = [train] if isinstance(train, str) else list(train)
    selected: set[str] = set()
    for item in items:
        if item == "all":
            selected.update(names)
        elif item == "head":
            selected.update(n for n in names if n.startswith("head."))
        elif item.startswith("last:"):
            count = int(item.split(":", 1)[1])
            stages = model.stages()
            if count > len(stages):
                raise FinetuneError(f"'{item}' asks for {count} stages but {model.backbone_name} has {len(stages)}")
            selected.update(n for n in names if n.startswith("head."))
            for stage in stages[len(stages) - count:]:
                selected.update(stage)
        else:
            pattern = re.compile(item)
            matched = {n for n in names if pattern.search(n)}
            if not matched:
                raise FinetuneError(f"'{item}' matches no parameter of {model.backbone_name} (names look like {names[0]})")
            selected |= matched
    return selected


def apply_trainable(model: nn.Module, trainable: set[str]) -> None:
    """Turn ``requires_grad`` on for ``trainable`` parameters and off for every other one."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def frozen_batchnorms(model: nn.Module, trainable: set[str], mode: str = "auto") -> list[nn.Module]:
    """The backbone's BatchNorm layers whose running statistics stay fixed while a stage trains.

    ``mode`` (a stage's ``batchnorm``) applies to the backbone: ``auto`` freezes the layers none of whose
    parameters train (for affine-free ones: whose parent doesn't train), ``eval`` every one, ``train``
    none. The head's normalisation is new and always trains.
    """
    if mode not in ("auto", "eval", "train"):
        raise FinetuneError(f"batchnorm must be auto, eval or train, got '{mode}'")
    frozen = []
    for name, module in model.named_modules():
        if mode == "train" or not name.startswith("backbone.") or not isinstance(module, _BatchNorm):
            continue
        owner = name if any(True for _ in module.parameters(recurse=False)) else name.rpartition(".")[0]
        prefix = owner + "."
        if mode == "eval" or not any(t.startswith(prefix) for t in trainable):
            frozen.append(module)
    return frozen


def freeze_stage(model: nn.Module, train: Selection, batchnorm: str = "auto") -> tuple[set[str], list[nn.Module]]:
    """Apply a stage's ``train`` selection and ``batchnorm`` mode to ``model``.

    Returns:
        ``(trainable, frozen_bn)``: the trainable parameter names and the BatchNorm layers kept in eval mode.
    """
    trainable = select_trainable(model, train)
    apply_trainable(model, trainable)
    return trainable, frozen_batchnorms(model, trainable, batchnorm)


def set_train_mode(model: nn.Module, frozen_bn: list[nn.Module]) -> None:
    """``model.train()``, then keep the frozen BatchNorm layers in eval mode so their running
    statistics don't drift while the rest trains."""
    model.train()
    for module in frozen_bn:
        module.eval()


def is_head_only(trainable: set[str]) -> bool:
    """Whether a stage's trainable parameters (:func:`select_trainable`) are all the head's: the stage that
    may train on cached backbone features."""
    return bool(trainable) and all(name.startswith("head.") for name in trainable)
