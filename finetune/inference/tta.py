"""Test-time augmentation: classify several views of each image and average their softmax probabilities.

A mode names the views, all built on the checkpoint's own eval pipeline (its resize, crop and
normalisation), so they need nothing the checkpoint does not hold:

* ``hflip``: the image and its mirror image (2 views).
* ``crops``: the image and its four corner crops, each :data:`CROP_FRACTION` of the height and width,
  every crop then going through the eval pipeline (5 views).
* ``hflip+crops``: those five and their mirror images (10 views).

:class:`TtaTransform` turns one image into a ``V×3×H×W`` stack of views, :class:`TtaModel` runs a model on
a batch of stacks and returns ``log(mean softmax)`` over the views, so the one batched forward pass
(:func:`finetune._device.forward_batches`), whose softmax undoes the log, yields the averaged probabilities.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError

TTA_MODES = ("hflip", "crops", "hflip+crops")
"""The test-time augmentation modes (``--tta``, ``evaluation.tta``)."""
VIEWS = {"hflip": 2, "crops": 5, "hflip+crops": 10}
"""Views per image of each mode: a batch of B images is a forward pass over B × views inputs, so TTA
batches hold ``batch_size // views`` images."""
CROP_FRACTION = 0.9
"""The height and width of each ``crops`` corner crop, as a fraction of the image's."""


def check_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`TTA_MODES`, else a :class:`~finetune.errors.FinetuneError`."""
    if mode not in TTA_MODES:
        raise FinetuneError(f"unknown test-time augmentation {mode!r} (expected one of: {', '.join(TTA_MODES)})")
    return mode


def views(image: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views of an H×W×3 image for ``mode``, the image itself first."""
    check_mode(mode)
    out = [image]
    if "crops" in mode:
        h, w = image.shape[:2]
        ch, cw = max(1, round(h * CROP_FRACTION)), max(1, round(w * CROP_FRACTION))
        out += [image[top:top + ch, left:left + cw] for top in (0, h - ch) for left in (0, w - cw)]
    if "hflip" in mode:
        out += [np.ascontiguousarray(v[:, ::-1]) for v in out]
    return out


class TtaTransform:
    """An eval pipeline applied to every view of ``mode``: ``transform(image=array)["image"]`` is the
    ``V×3×H×W`` stack (the albumentations calling convention, picklable for DataLoader workers)."""

    def __init__(self, transform: Callable, mode: str):
        self.transform = transform
        self.mode = check_mode(mode)

    @property
    def batch_normalize(self):
        """The eval pipeline's batch normalisation (it applies to a batch of view stacks as well)."""
        return getattr(self.transform, "batch_normalize", None)

    def __call__(self, *, image: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([self.transform(image=v)["image"] for v in views(image, self.mode)])}


class TtaModel(nn.Module):
    """``model`` over stacks of views (``B×V×3×H×W``): the log of the mean of the views' softmax
    probabilities, so a softmax of the output is that mean. A plain ``B×3×H×W`` batch is passed through."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(model.training)  # a wrapper in train mode would put model back in train mode after eval

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 5:
            return self.model(images)
        batch, num_views = images.shape[:2]
        probs = self.model(images.flatten(0, 1)).float().softmax(1)
        return probs.view(batch, num_views, -1).mean(1).log()
