"""Train and eval pipelines built with albumentations.

A pipeline maps an H×W×3 uint8 RGB array (from `load_image`) to a normalised float32 3×H×W tensor. It is
an ``albumentations.Compose``, called the albumentations way: ``transform(image=array)["image"]``.

Ops are named albumentations transforms with their keyword arguments, as a recipe writes them::

    ops = [
        {"name": "Resize", "height": 230, "width": 230},
        {"name": "Rotate", "limit": 15, "p": 1.0},   # albumentations' default p is 0.5
        {"name": "RandomCrop", "height": 224, "width": 224},
        {"name": "HorizontalFlip"},
    ]

which is the SpinalNet seed's Bird-225 and Caltech-101 train pipeline (``Resize((230, 230)) →
RandomRotation(15) → RandomCrop(224) → RandomHorizontalFlip``); its eval pipeline is
``[{"name": "Resize", "height": 224, "width": 224}]``."""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np

from finetune.errors import FinetuneError

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
"""Interpolation names (timm's ``pretrained_cfg["interpolation"]`` values among them) → OpenCV flags."""

_APPENDED = ("Normalize", "ToTensorV2")

SMALL_INPUT = 128
"""Inputs with a shorter side below this many pixels count as small for the default train crop."""
SMALL_INPUT_CROP_SCALE = (0.5, 1.0)
"""RandomResizedCrop's area fraction for small inputs. timm's 0.08-1 is ImageNet-from-scratch strength: at
64 px a crop of 8% of the area is an 18 px patch blown up 3.5 times, far from anything the eval transform
shows, and a head trained on cached features then meets very different ones. BiT's rule for small images
(a 128 px crop of a 160 px resize) keeps about 64% of the area."""


def build_transform(
    train: bool,
    *,
    input_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    ops: Sequence[Mapping] | None = None,
) -> A.Compose:
    """Build a train or eval pipeline ending in ``Normalize(mean, std)`` and ``ToTensorV2``.

    Without ``ops``, the defaults follow timm: train is ``RandomResizedCrop(input_size)`` (ratio 3/4-4/3)
    then ``HorizontalFlip``, with timm's ImageNet scale 0.08-1 from ``SMALL_INPUT`` px up and
    ``SMALL_INPUT_CROP_SCALE`` below it; eval resizes to ``input_size / crop_pct`` (the shorter side
    for a square input, both sides otherwise) then ``CenterCrop(input_size)``.

    Args:
        train: Build the train pipeline (else eval); used only when ``ops`` is None.
        input_size: The backbone's input: ``224``, ``(H, W)`` or timm's ``(3, H, W)``.
        mean: Per-channel mean on the 0-1 scale, usually the backbone's ``pretrained_cfg["mean"]``.
        std: Per-channel std on the 0-1 scale.
        interpolation: ``nearest``, ``bilinear``, ``bicubic``, ``area`` or ``lanczos``; used by the default
            ops and by any op in ``ops`` that takes an ``interpolation`` and does not set one.
        crop_pct: Eval centre-crop fraction of the default ops.
        ops: albumentations transforms as ``{"name": ..., **kwargs}`` mappings, replacing the defaults.
            An ``interpolation`` given as a name is mapped to its OpenCV flag. They must bring the image to
            ``input_size``.

    Returns:
        The pipeline: ``transform(image=uint8_rgb_array)["image"]`` is a float32 3×H×W tensor.

    Raises:
        FinetuneError: Unknown interpolation; an op that is not an albumentations transform, has a bad
            argument, or is Normalize/ToTensorV2 (appended already); ops that do not produce
            ``input_size``.
    """
    height, width = _size(input_size)
    flag = _interpolation(interpolation)
    if ops is None:
        ops = _default_ops(train, height, width, crop_pct)
    steps = [_op(i, spec, flag) for i, spec in enumerate(ops)]
    _check_output_size(A.Compose(steps), height, width)
    return A.Compose([*steps, Normalize(mean=tuple(mean), std=tuple(std)), A.ToTensorV2()])


class Normalize(A.Normalize):
    """``A.Normalize`` ("standard") doing a uint8 RGB image in one OpenCV table look-up of its 256 × 3 values.

    The values are albumentations' (float32 ``(x - 255·mean) / (255·std)``); albucore gets them by splitting
    the channels, three look-ups and a merge, which cost a quarter of a 224 px train sample's time
    (benchmarks/RESULTS.md, the data pipeline). Other inputs (float images) go to ``A.Normalize``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(mean=mean, std=std)
        table = (np.arange(256, dtype=np.float32)[:, None] - self.mean_np) * self.denominator
        self._table = table.astype(np.float32).reshape(256, 1, -1) if table.shape[1] == 3 else None

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if self._table is not None and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            return cv2.LUT(img, self._table)
        return super().apply(img, **params)


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


def preprocessing_transform(preprocessing: Mapping, *, train: bool = False,
                            ops: Sequence[Mapping] | None = None) -> A.Compose:
    """The pipeline ``preprocessing`` (:func:`resolve_preprocessing`) describes: eval with its
    ``eval_transforms``, or train with ``ops`` (the recipe's ``train_transforms``)."""
    return build_transform(
        train,
        input_size=preprocessing["input_size"],
        mean=preprocessing["mean"],
        std=preprocessing["std"],
        interpolation=preprocessing.get("interpolation", "bicubic"),
        crop_pct=preprocessing.get("crop_pct", 0.875),
        ops=ops if train else preprocessing.get("eval_transforms"),
    )


def _size(input_size: int | Sequence[int]) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)[-2:]
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise FinetuneError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size


def _interpolation(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise FinetuneError(f"unknown interpolation {name!r} (expected one of: {', '.join(INTERPOLATIONS)})")
    return INTERPOLATIONS[name]


def _default_ops(train: bool, height: int, width: int, crop_pct: float) -> list[dict]:
    if train:
        scale = (0.08, 1.0) if min(height, width) >= SMALL_INPUT else SMALL_INPUT_CROP_SCALE
        return [{"name": "RandomResizedCrop", "size": (height, width), "scale": scale}, {"name": "HorizontalFlip"}]
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    resize = (
        {"name": "SmallestMaxSize", "max_size": scale[0]}
        if height == width
        else {"name": "Resize", "height": scale[0], "width": scale[1]}
    )
    return [resize, {"name": "CenterCrop", "height": height, "width": width}]


def _op(index: int, spec: Mapping, default_interpolation: int) -> A.BasicTransform:
    """Instantiate one ``{"name": ..., **kwargs}`` spec, with albumentations' strict argument checks."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise FinetuneError(f"transform op {index}: expected a mapping with a 'name' key, got {spec!r}")
    name, kwargs = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    what = f"transform op {index} ({name})"
    cls = getattr(A, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        raise FinetuneError(f"{what}: not an albumentations transform")
    if name in _APPENDED:
        raise FinetuneError(f"{what}: Normalize and ToTensorV2 are appended already; set mean/std instead")
    if "interpolation" in inspect.signature(cls).parameters:
        interpolation = kwargs.get("interpolation", default_interpolation)
        kwargs["interpolation"] = _interpolation(interpolation) if isinstance(interpolation, str) else interpolation
    try:
        return cls(**kwargs, strict=True)
    except (TypeError, ValueError) as e:
        raise FinetuneError(f"{what}: {_one_line(e)}") from e


def _check_output_size(pipeline: A.Compose, height: int, width: int) -> None:
    """Run the ops once on a larger, non-square probe image and check they end at the input size."""
    probe = np.zeros((2 * height + 7, 2 * width + 3, 3), np.uint8)
    try:
        out = pipeline(image=probe)["image"]
    except Exception as e:
        raise FinetuneError(f"transform ops fail on a {probe.shape[0]}×{probe.shape[1]} image: {_one_line(e)}") from e
    if out.shape[:2] != (height, width):
        raise FinetuneError(
            f"transform ops produce {out.shape[0]}×{out.shape[1]} images, the backbone expects {height}×{width}"
        )


def _one_line(e: Exception) -> str:
    """An exception message on one line, without pydantic's 'For further information' links."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    return "; ".join(lines)
