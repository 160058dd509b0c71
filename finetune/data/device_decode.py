"""Batched JPEG decoding where the model runs: `DeviceJpegBatches`, for eval, extraction and predict on CUDA.

Loader workers only read each file's bytes (and its EXIF orientation from the header); the main process decodes
the batch's JPEGs in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA), orients them,
runs the eval pipeline's resize and crop as tensor ops on the device and normalises the batch there. Nothing a
CPU core decodes, nothing float32 crosses PCIe.

What falls back to the CPU path, per image, with the same accounting as `ImageDataset`: a file that is not a
JPEG (by its bytes), a CMYK or oversized JPEG (`load_image` converts or refuses those), and any image the
device decoder refuses; such an image is decoded by `decode_image` and sent through the CPU pipeline in the
worker. An image neither decodes is skipped and counted (``skipped``), as `collate_skip` does.

Only eval pipelines whose every op has a tensor twin qualify (`device_ops`): ``Resize``, ``SmallestMaxSize``,
``LongestMaxSize``, ``CenterCrop`` (the default eval pipeline is ``SmallestMaxSize`` + ``CenterCrop``). The
tensor resize antialiases (as Pillow and torchvision v2 do) where OpenCV's bicubic does not, so its pixels
are close to the CPU pipeline's, not equal; which path ran is logged. The same code runs on the CPU (it is
tested there): ``torchvision.io.decode_jpeg`` decodes lists on either device.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import albumentations as A
import cv2
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from finetune.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, read_file

logger = logging.getLogger(__name__)

_MODES = {cv2.INTER_NEAREST: InterpolationMode.NEAREST, cv2.INTER_LINEAR: InterpolationMode.BILINEAR,
          cv2.INTER_CUBIC: InterpolationMode.BICUBIC, cv2.INTER_AREA: InterpolationMode.BILINEAR,
          cv2.INTER_LANCZOS4: InterpolationMode.BICUBIC}
"""OpenCV flags → tensor interpolation (area and Lanczos have no tensor twin: antialiased bilinear/bicubic)."""


def device_ops(transform) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
    """The ops of a uint8 eval pipeline (built with ``device_normalize``) as tensor functions on C×H×W uint8,
    or None when one of them has no tensor twin (or the pipeline normalises its samples itself)."""
    if getattr(transform, "batch_normalize", None) is None:
        return None
    steps = list(getattr(transform, "transforms", []))
    if not steps or not isinstance(steps[-1], A.ToTensorV2):
        return None
    ops = []
    for step in steps[:-1]:
        mode = _MODES.get(getattr(step, "interpolation", cv2.INTER_LINEAR))
        if step.p != 1 or mode is None:
            return None
        if isinstance(step, A.Resize):
            ops.append(partial(F.resize, size=[step.height, step.width], interpolation=mode, antialias=True))
        elif isinstance(step, (A.SmallestMaxSize, A.LongestMaxSize)) and isinstance(step.max_size, int):
            ops.append(partial(_max_size, size=step.max_size, smallest=isinstance(step, A.SmallestMaxSize), mode=mode))
        elif isinstance(step, A.CenterCrop):
            ops.append(partial(_centre_crop, size=(step.height, step.width)))
        else:
            return None
    return ops


def _max_size(image: torch.Tensor, *, size: int, smallest: bool, mode: InterpolationMode) -> torch.Tensor:
    height, width = image.shape[-2:]
    side = min(height, width) if smallest else max(height, width)
    scale = size / side
    return F.resize(image, [max(1, round(height * scale)), max(1, round(width * scale))], interpolation=mode,
                    antialias=True)


def _centre_crop(image: torch.Tensor, *, size: tuple[int, int]) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = max(0, (height - size[0]) // 2), max(0, (width - size[1]) // 2)
    return image[..., top:top + size[0], left:left + size[1]]


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A C×H×W image turned as its EXIF ``orientation`` (1-8) says, as Pillow's ``exif_transpose`` does (the
    device decoder ignores EXIF)."""
    if orientation in (2, 4, 5, 7):
        image = image.flip(-1)
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise quarter turns
    return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


class _FileBytes(Dataset):
    """Per item: ``("jpeg", bytes, orientation, label, path)`` for a JPEG the device may decode, ``("image", uint8
    C×H×W, label)`` for one decoded here through the CPU ``transform``, None when unreadable."""

    def __init__(self, items: Sequence[tuple[str | os.PathLike, int]], transform: Callable, max_pixels: int):
        self.items, self.transform, self.max_pixels = list(items), transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            data = read_file(path)
        except ImageDecodeError as e:
            logger.warning("skipping unreadable image %s", e)
            return None
        if data[:2] == b"\xff\xd8":
            try:
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                    mode, orientation = img.mode, img.getexif().get(0x0112, 1)
                if mode in ("RGB", "L") and width * height <= self.max_pixels and orientation in range(1, 9):
                    return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), int(orientation), label, path
            except Exception:  # a header Pillow cannot read: the CPU path says why
                pass
        return self.cpu(data, path, label)

    def cpu(self, data: bytes, path, label):
        try:
            image, _ = decode_image(data, path, self.max_pixels)
        except ImageDecodeError as e:
            logger.warning("skipping unreadable image %s", e)
            return None
        return "image", self.transform(image=image)["image"], label


class DeviceJpegBatches:
    """Batches ``(inputs, labels, skipped)`` of ``items`` through the eval ``transform``, JPEGs decoded on
    ``device`` in batches (see the module docstring); ``inputs`` normalised on ``device``.

    Args:
        items: (image path, label) pairs.
        transform: a uint8 eval pipeline whose ops `device_ops` translates.
        device: where decoding, resizing and the model run.
        batch_size, num_workers: the file-reading loader.
    """

    def __init__(self, items: Sequence[tuple[str | os.PathLike, int]], transform: Callable, *,
                 device: torch.device | str, batch_size: int, num_workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.ops = device_ops(transform)
        if self.ops is None:
            raise ValueError("the pipeline has ops without a tensor twin: decode on the CPU")
        self.device = torch.device(device)
        self.normalize = transform.batch_normalize
        self.dataset = _FileBytes(items, transform, max_pixels)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list,
                                 generator=torch.Generator().manual_seed(0))
        self.decoded_on_device = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for samples in self.loader:
            yield self._batch(samples)

    def _batch(self, samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        jpegs = [s for s in kept if s[0] == "jpeg"]
        decoded = self._decode([s[1] for s in jpegs]) if jpegs else []
        images, labels, j = [], [], 0
        for sample in kept:
            if sample[0] == "jpeg":
                image = decoded[j]
                j += 1
                if image is None:  # the device decoder refused it: the CPU path, with its accounting
                    fallback = self.dataset.cpu(sample[1].numpy().tobytes(), sample[4], sample[3])
                    if fallback is None:
                        skipped += 1
                        continue
                    images.append(fallback[1].to(self.device))
                else:
                    image = orient(image, sample[2])
                    for op in self.ops:
                        image = op(image)
                    images.append(image)
                    self.decoded_on_device += 1
                labels.append(sample[3])
            else:
                images.append(sample[1].to(self.device, non_blocking=True))
                labels.append(sample[2])
        if not images:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
        return self.normalize(torch.stack(images)), torch.tensor(labels, dtype=torch.int64), skipped

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Every JPEG decoded on the device in one call, or one by one when the batch call fails (None for
        an image the decoder refuses)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():  # deprecated in torchvision 0.29 for TorchCodec, which is not a dependency
                warnings.simplefilter("ignore", DeprecationWarning)
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out = []
            for one in data:
                try:
                    out.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=self.device)[0])
                except RuntimeError:
                    out.append(None)
            return out


def device_decoding(items, transform, *, device: torch.device, batch_size: int, num_workers: int,
                    enabled: bool | None = None):
    """`DeviceJpegBatches` of ``items`` when it pays and applies: on CUDA (or when ``enabled``), with a pipeline
    `device_ops` translates and image files for sources; else None (the caller's CPU loader runs)."""
    use = device.type == "cuda" if enabled is None else enabled
    if not use or device_ops(transform) is None:
        return None
    if not all(isinstance(path, (str, os.PathLike)) for path, _ in items):
        return None
    logger.info("decoding JPEG batches on %s", device)
    return DeviceJpegBatches([(Path(p), label) for p, label in items], transform, device=device,
                             batch_size=batch_size, num_workers=num_workers)
