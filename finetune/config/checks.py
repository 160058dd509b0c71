"""Checks of a validated recipe that the schema alone cannot make: against the model it names (backbone,
head options, input size, stage selections: built on the meta device) and against this machine (fp16 on the
CPU, a cache folder that can be made)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.optim import list_optimizers

from finetune.config.schema import Recipe
from finetune.errors import FinetuneError, one_line, short_repr
from finetune.models.factory import check_forward, create_model, parse_head, resolve_preprocessing
from finetune.models.heads import head_options
from finetune.models.params import is_head_only, select_trainable

def check_against_model(recipe: Recipe, source: str = "recipe") -> dict:
    """Check what the schema alone can't: the backbone exists, head options exist, every stage's optimizer
    exists, the backbone takes the input size and the head fits the features it returns, and every stage's
    ``train`` selection matches parameters of the model. Builds and runs the model on the meta device (no
    memory, no weights).

    Returns:
        The run's preprocessing (`resolve_preprocessing` of the backbone's data config with the recipe's
        ``data`` overrides; the input size as ``[3, H, W]``), resolved here once for everything after.
    """
    backbone = recipe.model.backbone
    if not timm.is_model(backbone):
        raise FinetuneError(f"{source}: model.backbone: unknown timm backbone '{backbone}'")
    try:
        head = parse_head(recipe.model.head)
        allowed = head_options(head["name"])
    except FinetuneError as e:
        raise FinetuneError(f"{source}: model.head: {e}") from None
    for option in head:
        if option != "name" and option not in allowed:
            raise FinetuneError(
                f"{source}: model.head.{option}: head '{head['name']}' has no option '{option}' (options: {', '.join(allowed)})"
            )
    try:
        with torch.device("meta"):
            model = create_model(backbone, 2, head=head, pretrained=False, **recipe.model.backbone_kwargs)
    except FinetuneError as e:
        raise FinetuneError(f"{source}: model: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError) as e:
        # timm's model constructors check their arguments in many ways, none of them a FinetuneError
        raise FinetuneError(one_line(f"{source}: model.backbone_kwargs: {type(e).__name__}: {e}")) from None
    data = recipe.data
    preprocessing = resolve_preprocessing(model.data_config(), input_size=data.input_size, mean=data.mean, std=data.std,
                                          interpolation=data.interpolation, crop_pct=data.crop_pct,
                                          eval_transforms=data.eval_transforms)
    try:
        check_forward(model, tuple(preprocessing["input_size"]))
    except FinetuneError as e:
        raise FinetuneError(f"{source}: model: {e}") from None
    for i, stage in enumerate(recipe.stages):
        if stage.optimizer.name not in list_optimizers():
            raise FinetuneError(one_line(f"{source}: stages.{i}.optimizer.name: unknown optimizer "
                                         f"'{stage.optimizer.name}' (see timm.optim.list_optimizers())"))
        try:
            trainable = select_trainable(model, stage.train)
        except FinetuneError as e:
            raise FinetuneError(f"{source}: stages.{i}.train: {e}") from None
        if stage.mixup and stage.feature_cache is True and is_head_only(trainable):
            raise FinetuneError(f"{source}: stages.{i}.mixup: a head-only stage with feature_cache: true trains on "
                                "cached features, which cannot be mixed; set feature_cache: auto or false")
    return preprocessing


def check_environment(recipe: Recipe, source: str = "recipe") -> None:
    """Check what training will use on this machine, so it fails now rather than after hours:
    fp16 only where the device is a GPU, and a ``cache_dir`` that can be made (nothing is created)."""
    cfg = recipe.training
    if cfg.precision == "fp16" and (cfg.device == "cpu" or (cfg.device == "auto" and not _cuda_available())):
        device = "cpu" if cfg.device == "cpu" else "auto, no CUDA device"
        raise FinetuneError(
            f"{source}: training.precision: fp16 on the CPU (training.device: {device}) runs many times slower "
            "than fp32; use fp32 or bf16 there"
        )
    if cfg.cache_dir is not None:
        problem = folder_problem(cfg.cache_dir)
        if problem:
            raise FinetuneError(one_line(f"{source}: training.cache_dir: {problem}"))


def folder_problem(folder: str | Path) -> Optional[str]:
    """Why ``folder`` could not be used or created as a writable folder, or None; creates nothing."""
    try:
        path = Path(folder).expanduser().absolute()
        for parent in (path, *path.parents):
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a folder"
                if not os.access(parent, os.W_OK | os.X_OK):
                    return f"{parent} is not writable"
                return None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        return f"{short_repr(str(folder))} is not a usable path: {e}"
    return None


def _cuda_available() -> bool:
    return torch.cuda.is_available()
