"""Classification heads: a small registry mapping pooled backbone features to logits.

Every head is built as ``factory(in_features, num_classes, **options) -> nn.Module``. Adding a head is one
class plus one ``@register_head`` line.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from timm.layers import get_act_layer
from torch import nn

from finetune.errors import FinetuneError

_HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str):
    """Class decorator adding a head factory to the registry under ``name``."""

    def decorator(factory):
        _HEADS[name] = factory
        return factory

    return decorator


def list_heads() -> list[str]:
    return sorted(_HEADS)


def head_options(name: str) -> dict[str, object]:
    """The options a head takes, with their defaults (``inspect.Parameter.empty`` when required)."""
    factory = _get(name)
    params = list(inspect.signature(factory).parameters.values())[2:]  # skip in_features, num_classes
    return {p.name: p.default for p in params}


def create_head(name: str, in_features: int, num_classes: int, **options) -> nn.Module:
    """Build the head ``name`` for ``in_features`` pooled features and ``num_classes`` outputs.

    Raises:
        FinetuneError: for an unknown head or an option the head does not take.
    """
    allowed = head_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FinetuneError(
            f"head '{name}' has no option {', '.join(map(repr, unknown))} (options: {', '.join(allowed)})"
        )
    return _get(name)(in_features, num_classes, **options)


def _get(name: str):
    if name not in _HEADS:
        raise FinetuneError(f"unknown head '{name}' (known heads: {', '.join(list_heads())})")
    return _HEADS[name]


@register_head("linear")
class LinearHead(nn.Sequential):
    """Optional dropout, then one Linear layer: the classifier timm models ship with."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


@register_head("mlp")
class MLPHead(nn.Sequential):
    """The seed's "2-layer FC" baseline: (Linear → ReLU → Dropout) per hidden size, then Linear to classes."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (4096, 4096),
        dropout: float = 0.5,
        activation: str = "relu",
    ):
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), get_act_layer(activation)(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


@register_head("spinal")
class SpinalHead(nn.Module):
    """The SpinalNet head (Kabir et al., arXiv 2007.03347), generalised to any depth and number of splits.

    The feature vector is cut into ``splits`` parts. Hidden layer ``i`` sees part ``i % splits`` and, from
    the second layer on, the previous hidden layer's output. Each hidden layer is
    Dropout → Linear → BatchNorm1d → activation. The output layer is Dropout → Linear over all hidden
    layers' outputs concatenated. The defaults are the seed's: 4 layers of width 1024, 2 splits, p=0.5, ReLU.

    When ``in_features`` is not divisible by ``splits``, the parts follow ``torch.tensor_split``: the first
    ``in_features % splits`` parts are one feature longer, so every feature is used and none twice (the
    seed's ``round(n / 2)`` would drop or repeat one).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 1024,
        layers: int = 4,
        splits: int = 2,
        dropout: float = 0.5,
        batchnorm: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        if layers < 1 or splits < 1 or width < 1:
            raise FinetuneError(f"spinal head needs layers, splits and width >= 1 (got {layers}, {splits}, {width})")
        if splits > in_features:
            raise FinetuneError(f"spinal head cannot cut {in_features} features into {splits} splits")
        self.splits = splits
        part_sizes = [len(p) for p in torch.arange(in_features).tensor_split(splits)]
        act_layer = get_act_layer(activation)
        self.hidden = nn.ModuleList()
        for i in range(layers):
            in_size = part_sizes[i % splits] + (width if i else 0)
            self.hidden.append(
                nn.Sequential(
                    nn.Dropout(dropout),
                    nn.Linear(in_size, width),
                    nn.BatchNorm1d(width) if batchnorm else nn.Identity(),
                    act_layer(),
                )
            )
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(width * layers, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.tensor_split(self.splits, dim=1)
        outputs = []
        prev = None
        for i, layer in enumerate(self.hidden):
            part = parts[i % self.splits]
            prev = layer(part if prev is None else torch.cat([part, prev], dim=1))
            outputs.append(prev)
        return self.out(torch.cat(outputs, dim=1))
