"""Train and eval pipelines built with albumentations.

A pipeline maps an H×W×3 uint8 RGB array (from `load_image`) to a normalised float32 3×H×W tensor. It is
an ``albumentations.Compose``, called the albumentations way: ``transform(image=array)["image"]``.

Built with ``device_normalize=True`` (what training, validation, extraction, eval and predict use), the
pipeline stops before ``Normalize`` and returns a uint8 3×H×W tensor: batches collate as uint8 (a quarter
of float32's bytes through shared memory, pinned memory and PCIe) and :class:`BatchNormalize`, carried as the
pipeline's ``batch_normalize`` (:func:`normalizer_of`), normalises each whole batch where the model runs
(:class:`~finetune.data.datasets.DeviceBatches`), with the same arithmetic as ``Normalize``'s table.

Ops are named albumentations transforms with their keyword arguments, as a recipe writes them::

    ops = [
        {"name": "Resize", "height": 230, "width": 230},
        {"name": "Rotate", "limit": 15, "p": 1.0},   # albumentations' default p is 0.5
        {"name": "RandomCrop", "height": 224, "width": 224},
        {"name": "HorizontalFlip"},
    ]

which is the SpinalNet seed's Bird-225 and Caltech-101 train pipeline (``Resize((230, 230)) →
RandomRotation(15) → RandomCrop(224) → RandomHorizontalFlip``); its eval pipeline is
``[{"name": "Resize", "height": 224, "width": 224}]``.

Augmentation presets (``data.augment``) follow the ops in the train pipeline: a timm policy (RandAugment,
TrivialAugment or AutoAugment, :class:`TimmPolicy`) and albumentations' ``Erasing`` (random erasing, on the
uint8 image before ``Normalize``). :func:`size_defaults` gives the per-input-size defaults of ``auto``."""
from __future__ import annotations

import inspect
import math
import random
from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform

from finetune import _moved
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
    augment: Mapping | str | None = None,
    device_normalize: bool = False,
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
        augment: An augmentation preset (``data.augment`` as a dict, see :func:`augment_ops`) or ``"auto"``
            (:func:`size_defaults` for ``input_size``), applied after ``ops`` in the train pipeline only.
        device_normalize: Leave ``Normalize`` out: the pipeline returns uint8 3×H×W tensors and carries
            the normalisation as ``batch_normalize`` (:class:`BatchNormalize`), applied to whole batches.

    Returns:
        The pipeline: ``transform(image=uint8_rgb_array)["image"]`` is a float32 3×H×W tensor (uint8 with
        ``device_normalize``).

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
    if train and augment == "auto":
        augment = size_defaults((height, width))["augment"]
    if train and augment:
        steps += augment_ops(augment, input_size=(height, width), mean=mean)
    if device_normalize:
        pipeline = A.Compose([*steps, ToTensorV2()])
        pipeline.batch_normalize = BatchNormalize(mean, std)
        return pipeline
    return A.Compose([*steps, Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])


class BatchNormalize:
    """``Normalize(mean, std)`` of a whole uint8 batch (…×3×H×W) on the batch's own device, as float32.

    The arithmetic is ``Normalize``'s: ``(x - 255·mean) · 1/(255·std)`` in float32, so a batch normalised
    here equals one whose samples the CPU normalised, to float32 rounding (1e-6). Float batches (features,
    or a pipeline that normalised already) are returned as they are."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch
        if batch.device not in self._constants:
            shift = torch.tensor(self.mean, dtype=torch.float64) * 255
            scale = 1 / (torch.tensor(self.std, dtype=torch.float64) * 255)
            self._constants[batch.device] = (shift.float().view(3, 1, 1).to(batch.device),
                                             scale.float().view(3, 1, 1).to(batch.device))
        shift, scale = self._constants[batch.device]
        return batch.float().sub_(shift).mul_(scale)

    def __getstate__(self) -> dict:  # the per-device constants stay behind (DataLoader workers pickle it)
        return {"mean": self.mean, "std": self.std, "_constants": {}}

    def __repr__(self) -> str:
        return f"BatchNormalize(mean={self.mean}, std={self.std})"


def normalizer_of(transform) -> BatchNormalize | None:
    """The :class:`BatchNormalize` a pipeline built with ``device_normalize`` leaves to its batches (None for
    a pipeline that normalises its samples itself)."""
    return getattr(transform, "batch_normalize", None)


def size_defaults(input_size: int | Sequence[int]) -> dict:
    """The augmentation preset and Mixup/CutMix that ``auto`` (``data.augment: auto``, ``training.mixup: auto``,
    the no-recipe defaults of ``finetune train --data --backbone``) means for an input size.

    Mild on small images, where a shear, a rotation or an erased patch removes much of the object:

    * shorter side < 96 px: no policy, no random erasing, no Mixup/CutMix;
    * 96-159 px: TrivialAugment (one op per image, magnitude uniform in 0-5); no erasing, no mixing;
    * >= 160 px: RandAugment (2 ops, magnitude 9, std 0.5, timm's ``rand-m9-n2-mstd0.5``), random erasing
      with p 0.25, and Mixup (alpha 0.2) or CutMix (alpha 1.0) on half of the batches.

    Returns:
        ``{"augment": dict | None, "mixup": dict | None}`` in the recipe's form (``data.augment``,
        ``training.mixup``).
    """
    side = min(_size(input_size))
    if side < 96:
        return {"augment": None, "mixup": None}
    if side < 160:
        return {"augment": {"preset": "trivialaugment", "magnitude": 5}, "mixup": None}
    return {
        "augment": {"preset": "randaugment", "num_ops": 2, "magnitude": 9, "magnitude_std": 0.5,
                    "random_erasing": {"p": 0.25}},
        "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 0.5, "switch_prob": 0.5},
    }


def augment_ops(augment: Mapping, *, input_size: Sequence[int], mean: Sequence[float]) -> list[A.BasicTransform]:
    """The albumentations steps of an augmentation preset (``data.augment``, validated by the recipe).

    * ``randaugment``: timm's RandAugment, ``num_ops`` ops drawn with replacement from timm's 15, each applied
      with probability 0.5 (timm's default) at ``magnitude`` (0-10) plus Gaussian noise of ``magnitude_std``.
    * ``trivialaugment``: TrivialAugment (Müller & Hutter, 2021) as timm writes it: one op per image, always
      applied, its magnitude drawn uniformly from 0 to ``magnitude`` (timm's op ranges, narrower than
      torchvision's "wide" ones at ``magnitude: 10``).
    * ``autoaugment``: timm's AutoAugment ImageNet ``policy`` (``v0``, ``v0r``, ``original``, ``originalr``).
    * ``random_erasing``: albumentations' ``Erasing`` (Zhong et al., 2017) with probability ``p``, an erased
      area of ``scale`` of the image and aspect ``ratio``, filled with per-pixel noise (``fill: random``),
      one random colour (``random_uniform``) or a value.

    timm's ops work on PIL images and draw from Python's and NumPy's global generators: :class:`TimmPolicy`
    seeds them from the pipeline's own generator for each image and restores them after, so the policy is as
    deterministic per (seed, epoch, sample) as the rest of the pipeline. Translations are relative to the
    image (timm's ``translate_const`` is 45% of the shorter side), uncovered pixels take the mean colour, and
    geometric ops interpolate bilinearly (Pillow's bicubic affine transform costs three times as much).
    """

    height, width = _size(input_size)
    # bilinear whatever the run's interpolation: Pillow's bicubic affine costs 3x as much (9 vs 3 ms at 224 px)
    hparams = {"translate_const": int(min(height, width) * 0.45),
               "img_mean": tuple(round(255 * x) for x in mean), "interpolation": Image.Resampling.BILINEAR}
    preset = augment.get("preset", "none")
    steps: list[A.BasicTransform] = []
    if preset == "randaugment":
        config = f"rand-m{augment.get('magnitude', 9)}-n{augment.get('num_ops', 2)}-mstd{augment.get('magnitude_std', 0.5)}"
        steps.append(TimmPolicy(rand_augment_transform(config, hparams), config))
    elif preset == "trivialaugment":  # uniform magnitude (mstd > 100), one op, always applied
        config = f"rand-m{augment.get('magnitude', 9)}-n1-mstd101-p1.0"
        steps.append(TimmPolicy(rand_augment_transform(config, hparams), config))
    elif preset == "autoaugment":
        config = f"{augment.get('policy', 'v0')}-mstd{augment.get('magnitude_std', 0.5)}"
        steps.append(TimmPolicy(auto_augment_transform(config, hparams), config))
    elif preset != "none":
        raise FinetuneError(f"unknown augmentation preset {preset!r} (expected randaugment, trivialaugment, "
                            "autoaugment or none)")
    erasing = augment.get("random_erasing")
    if erasing:
        fill = erasing.get("fill", "random")
        steps.append(A.Erasing(p=erasing.get("p", 0.25), scale=tuple(erasing.get("scale", (0.02, 0.33))),
                               ratio=tuple(erasing.get("ratio", (0.3, 3.3))),
                               fill=fill if isinstance(fill, str) else float(fill)))
    return steps


class TimmPolicy(A.ImageOnlyTransform):
    """A timm augmentation policy (PIL in, PIL out) as an albumentations step on uint8 RGB arrays.

    timm's policies draw from the global ``random`` and ``numpy.random`` generators. Each image's draw is
    seeded from this step's own generator (which ``Compose.set_random_state`` sets, see `ImageDataset`), and
    the global generators are restored afterwards, so training's own random stream is untouched.

    Args:
        policy: A timm policy, e.g. ``rand_augment_transform("rand-m9-n2-mstd0.5", hparams)``.
        config: Its timm configuration string (shown in the repr).
    """

    def __init__(self, policy, config: str, p: float = 1.0):
        super().__init__(p=p)
        self.policy = policy
        self.config = config
        ops = getattr(policy, "ops", None) or [op for sub in getattr(policy, "policy", []) for op in sub]
        for op in ops:  # RandAugment's ops, or AutoAugment's sub-policies' ops
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def get_params(self) -> dict:
        return {"seed": self.py_random.getrandbits(32)}

    def apply(self, img: np.ndarray, seed: int = 0, **params) -> np.ndarray:

        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return np.asarray(self.policy(Image.fromarray(img)))
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("config",)


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize, keeping at least 1 bit: timm's ``Posterize`` asks for 0 bits below magnitude 2.5 (and
    ``PosterizeIncreasing`` above 7.5), which Pillow 13 refuses (older Pillow made the image black)."""

    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(int(bits_to_keep), 1))


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


class ToTensorV2(A.ToTensorV2):
    """``A.ToTensorV2`` whose 3×H×W image tensor is contiguous, its channels copied apart by OpenCV.

    albumentations returns a transposed view of the H×W×3 array; the collate that stacks a batch of such views
    then gathers every byte at a stride of 3, which took 115 µs of a 224 px uint8 sample's time, against 8 µs
    for ``cv2.split`` into the planes of a 3×H×W array plus 13 µs to stack contiguous ones (numpy's copy of
    the transpose: 42 µs). The values are the same; other shapes and dtypes OpenCV does not split go through a
    numpy copy."""

    def apply(self, img: np.ndarray, **params) -> torch.Tensor:
        if img.ndim == 2:
            return torch.from_numpy(np.ascontiguousarray(img[None]))
        if img.ndim != 3:
            return super().apply(img, **params)
        planes = np.empty((img.shape[2], *img.shape[:2]), dtype=img.dtype)
        views = list(planes)
        split = img.dtype in (np.uint8, np.float32) and 1 < img.shape[2] <= 4
        if not split or any(got is not view for got, view in zip(cv2.split(img, views), views)):
            planes[...] = img.transpose(2, 0, 1)  # (OpenCV returns new arrays when it cannot write into ours)
        return torch.from_numpy(planes)


def preprocessing_transform(preprocessing: Mapping, *, train: bool = False,
                            ops: Sequence[Mapping] | None = None, augment: Mapping | str | None = None,
                            device_normalize: bool = False) -> A.Compose:
    """The pipeline ``preprocessing`` (:func:`~finetune.models.factory.resolve_preprocessing`) describes: eval
    with its ``eval_transforms``, or train with ``ops`` (the recipe's ``train_transforms``) and ``augment``
    (``data.augment``); uint8 out with ``device_normalize`` (see :func:`build_transform`)."""
    return build_transform(
        train,
        input_size=preprocessing["input_size"],
        mean=preprocessing["mean"],
        std=preprocessing["std"],
        interpolation=preprocessing.get("interpolation", "bicubic"),
        crop_pct=preprocessing.get("crop_pct", 0.875),
        ops=ops if train else preprocessing.get("eval_transforms"),
        augment=augment if train else None,
        device_normalize=device_normalize,
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


# moved to finetune.models.factory (a backbone's data config resolved with the recipe's overrides), for one release
__getattr__ = _moved.attribute_getter(__name__, ("resolve_preprocessing",), "finetune.models.factory")
