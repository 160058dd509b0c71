"""``create_model``: a timm backbone with its classifier replaced by a finetune head."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import timm
import torch
from timm.layers import to_2tuple
from timm.models import group_parameters
from torch import nn

from finetune.errors import FinetuneError, MAX_MESSAGE, first_line, short_repr
from finetune.models.heads import create_head
from finetune.models.weights import (
    SOURCES_HINT,
    Pretrained,
    hub_offline_unless_reachable,
    list_offline_weights,
    load_backbone_state,
    offline_weights,
    read_state_dict,
)

HeadSpec = Union[str, Mapping[str, Any]]


class FinetuneModel(nn.Module):
    """Images → logits: ``head(backbone(x))``.

    Attributes:
        backbone: the timm model made with ``num_classes=0``; it returns pooled features (after the
            pre-logits stage of models that have one), ``num_features`` wide.
        head: the classification head, from :mod:`finetune.models.heads`.
        backbone_name: the timm model name.
        head_config: ``{"name": ..., **options}``, enough to rebuild the head.
        backbone_kwargs: the extra ``timm.create_model`` arguments, enough to rebuild the backbone.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        backbone_name: str,
        head_config: dict[str, Any],
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_name = backbone_name
        self.head_config = dict(head_config)
        self.backbone_kwargs = dict(backbone_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def num_features(self) -> int:
        """The width of the features ``backbone(x)`` returns: the head's input."""
        return pooled_width(self.backbone)

    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing: input_size, interpolation, mean, std, crop_pct, crop_mode (timm's).

        A backbone built for another ``img_size`` (``backbone_kwargs``) gets that input size: timm's
        config keeps the pretrained one, which fixed-size models (vit, swin, levit) cannot take."""
        config = timm.data.resolve_model_data_config(self.backbone)
        if self.backbone_kwargs.get("img_size") is not None:
            config["input_size"] = (config["input_size"][0], *to_2tuple(self.backbone_kwargs["img_size"]))
        return config

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's timm group matcher with names prefixed ``backbone.``; the head falls in the last
        group. Lets timm's layer-wise lr decay and ``group_parameters`` work on the whole model."""
        matcher = self.backbone.group_matcher(coarse=coarse) if hasattr(self.backbone, "group_matcher") else {}
        return {
            key: _prefix_pattern(rules) if isinstance(rules, str) else [(_prefix_pattern(p), order) for p, order in rules]
            for key, rules in matcher.items()
        }

    def no_weight_decay(self) -> set[str]:
        skip = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in skip}

    def stages(self) -> list[list[str]]:
        """The backbone's stages in input-to-output order, each a list of parameter names (prefixed
        ``backbone.``), from timm's ``group_matcher(coarse=True)``."""
        return backbone_stages(self.backbone, prefix="backbone.")


def pooled_width(backbone: nn.Module) -> int:
    """The width of the features a timm model made with ``num_classes=0`` returns.

    That is timm's ``head_hidden_size``, not ``num_features``: models with a pre-logits stage after pooling
    (mobilenetv3's ``conv_head``, ghostnet, vgg, convnext/vit with a ``head_hidden_size``) widen the pooled
    ``num_features`` channels before the classifier. Older timm models without the attribute have none.
    """
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def check_forward(model: FinetuneModel, input_size: Sequence[int]) -> None:
    """Run ``model`` (built on the meta device) on a batch of ``input_size`` images: shapes only, no memory
    or compute. Catches a backbone that cannot take that input size, one that returns unpooled features,
    and a head that does not fit the features the backbone returns, before any training.

    Raises:
        FinetuneError: naming the mismatch.
    """
    name, size = model.backbone_name, "×".join(map(str, input_size))
    was_training = model.training
    model.eval()  # batch statistics need more than one value per channel; eval mode needs none
    try:
        with torch.no_grad():
            try:
                features = model.backbone(torch.empty(2, *input_size, device="meta"))
            except Exception as e:
                if _meta_unsupported(e):
                    return
                raise FinetuneError(
                    f"{name} cannot take {size} images: {first_line(e, limit=MAX_MESSAGE)} (set data.input_size to the size it "
                    "takes, or build it for this size with model.backbone_kwargs.img_size)"
                ) from None
            if features.ndim != 2:
                raise FinetuneError(
                    f"{name} returns features of shape {list(features.shape[1:])} per image, not pooled ones "
                    "(check model.backbone_kwargs such as global_pool)"
                )
            if features.shape[1] != model.num_features:
                raise FinetuneError(
                    f"{name} returns {features.shape[1]} features per image but the "
                    f"{model.head_config['name']} head was made for {model.num_features}"
                )
            try:
                model.head(features)
            except Exception as e:
                if not _meta_unsupported(e):
                    raise FinetuneError(
                        f"the {model.head_config['name']} head does not fit the {features.shape[1]} features of "
                        f"{name}: {first_line(e, limit=MAX_MESSAGE)}"
                    ) from None
    finally:
        model.train(was_training)


def _meta_unsupported(e: Exception) -> bool:
    # ops with data-dependent results (.item(), nonzero) have no meta version: nothing to conclude
    return isinstance(e, NotImplementedError) or "meta" in str(e).lower()




def backbone_stages(backbone: nn.Module, prefix: str = "") -> list[list[str]]:
    """Parameter names of a timm model grouped by stage, input to output, from its ``group_matcher``.

    Raises:
        FinetuneError: for a model without a (coarse) group matcher (pit, metaformer, rdnet).
    """
    name = getattr(backbone, "pretrained_cfg", {}).get("architecture") or type(backbone).__name__
    hint = "to split it into stages for 'last:N'; select its parameters with regexes instead"
    if not hasattr(backbone, "group_matcher"):
        raise FinetuneError(f"{name} has no timm group_matcher {hint}")
    try:
        matcher = backbone.group_matcher(coarse=True)
    except (AssertionError, NotImplementedError):  # timm's way of saying "no coarse grouping"
        raise FinetuneError(f"{name} has no coarse timm group_matcher {hint}") from None
    groups = group_parameters(backbone, matcher)
    return [[prefix + n for n in names] for _, names in sorted(groups.items())]


def _prefix_pattern(pattern: str) -> str:
    # re.match anchors every alternative of timm's patterns at the name's start: keep that under the prefix
    return r"^backbone\.(?:" + pattern.removeprefix("^") + ")"


def parse_head(head: HeadSpec) -> dict[str, Any]:
    """``"spinal"`` or ``{"name": "spinal", "width": 512}`` → ``{"name": ..., **options}``."""
    if isinstance(head, str):
        return {"name": head}
    if isinstance(head, Mapping) and isinstance(head.get("name"), str):
        return dict(head)
    raise FinetuneError(f"head must be a name or a mapping with a 'name' key, got {head!r}")


def check_backbone_kwargs(kwargs: Any) -> None:
    """Refuse ``backbone_kwargs`` that timm would take and fail on only later, deep inside a forward pass.

    The one rule for a recipe's ``model.backbone_kwargs`` and a checkpoint's ``backbone_kwargs``: a mapping
    of names to values, and every ``*drop*_rate`` a number from 0 to 1 (timm keeps drop rates as given and
    first uses them in a training forward pass).

    Raises:
        ValueError: naming the key and the value.
    """
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"must be a mapping of timm.create_model arguments (got {short_repr(kwargs)})")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{short_repr(key)} is not an argument name")
        if re.fullmatch(r"\w*drop\w*_rate", key) and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
        ):
            raise ValueError(f"{key} must be a number from 0 to 1 (got {short_repr(value)})")


def resolve_preprocessing(
    data_config: Mapping,
    *,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    eval_transforms: Sequence[Mapping] | None = None,
) -> dict:
    """A checkpoint's ``preprocessing``: the backbone's timm data config with the recipe's overrides applied
    (None keeps the backbone's value)."""
    size = input_size if input_size is not None else data_config["input_size"]
    if isinstance(size, int):
        size = (3, size, size)
    elif len(size) == 2:
        size = (3, *size)
    return {
        "input_size": list(size),
        "mean": list(mean or data_config["mean"]),
        "std": list(std or data_config["std"]),
        "interpolation": interpolation or data_config.get("interpolation", "bicubic"),
        "crop_pct": crop_pct or data_config.get("crop_pct", 0.875),
        "crop_mode": data_config.get("crop_mode", "center"),
        "eval_transforms": eval_transforms,
    }


def create_model(
    backbone: str,
    num_classes: int,
    head: HeadSpec = "spinal",
    pretrained: Pretrained = False,
    **backbone_kwargs: Any,
) -> FinetuneModel:
    """Build a timm backbone (pooled features out) topped by a finetune head.

    Args:
        backbone: any timm model name (``timm.list_models()``).
        num_classes: number of output classes.
        head: a head name (``spinal``, ``linear``, ``mlp``) or ``{"name": ..., **options}``.
        pretrained: ``False``/``None`` (random init), ``True`` (timm hub weights), ``"offline"`` (weights
            shipped in a Python package, see :func:`finetune.models.weights.list_offline_weights`), or the
            path of a local ``.safetensors``/``.pth``/``.pt``/``.bin`` file.
        **backbone_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``img_size``, …).

    Returns:
        A :class:`FinetuneModel`.
    """
    if num_classes < 1:
        raise FinetuneError(f"num_classes must be at least 1, got {num_classes}")
    head_config = parse_head(head)
    if backbone not in timm.list_models() and not timm.is_model(backbone):
        raise FinetuneError(f"unknown timm backbone '{backbone}' (see `finetune models PATTERN`)")

    net = _create_backbone(backbone, pretrained, backbone_kwargs)
    options = {k: v for k, v in head_config.items() if k != "name"}
    net_head = create_head(head_config["name"], pooled_width(net), num_classes, **options)
    return FinetuneModel(net, net_head, backbone, head_config, backbone_kwargs)


def _create_backbone(name: str, pretrained: Pretrained, kwargs: dict[str, Any]) -> nn.Module:
    if pretrained is True:
        try:
            with hub_offline_unless_reachable():
                return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except RuntimeError as e:  # timm: "No pretrained weights exist for this model"
            raise FinetuneError(f"timm has no pretrained weights for '{name}': {e}; {SOURCES_HINT}") from None
        except Exception as e:
            if type(e).__module__.startswith(("huggingface_hub", "requests", "urllib3", "httpx")) or isinstance(e, OSError):
                raise FinetuneError(
                    f"cannot download timm weights for '{name}' (no network and not in the local cache); {SOURCES_HINT}"
                ) from None
            raise

    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if pretrained in (False, None):
        return model
    if isinstance(pretrained, str) and pretrained == "offline":
        source = offline_weights(name)
        if source is None:
            known = ", ".join(list_offline_weights()) or "none"
            raise FinetuneError(f"no offline weights are registered for '{name}' (offline weights exist for: {known})")
        load_backbone_state(model, source.load(), source=f"package {source.package}")
        return model
    if isinstance(pretrained, (str, Path)):
        load_backbone_state(model, read_state_dict(pretrained), source=str(pretrained))
        return model
    raise FinetuneError(f"pretrained must be true, false, 'offline' or a weights file path, got {pretrained!r}")
