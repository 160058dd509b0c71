"""`ImageDataset`: decoded, augmented samples that skip unreadable files instead of crashing or substituting."""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from finetune.data._decode import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image

logger = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images with class labels, decoded by `load_image` and passed through an albumentations pipeline.

    A file that cannot be read gives ``None`` (with a warning naming it) rather than an exception or
    another sample; `collate_skip` drops and counts these.

    Augmentation is deterministic: before each sample the pipeline's random state is set from
    ``(seed, epoch, index)``, so a sample's augmentation does not depend on the number of workers, on
    which worker loads it, or on the order samples are loaded in. The epoch lives in shared memory, so
    `set_epoch` reaches DataLoader workers that are already running (``persistent_workers=True``).

    Args:
        items: (image path, class index) pairs, e.g. `Manifest.items`.
        transform: An albumentations pipeline (`build_transform`): called as
            ``transform(image=array)["image"]`` and re-seeded through its ``set_random_state``.
        seed: Non-negative augmentation seed.
        max_pixels: Largest width × height accepted.
    """

    def __init__(
        self,
        items: Sequence[tuple[str | os.PathLike, int]],
        transform: Callable,
        *,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.items = [(Path(path), int(label)) for path, label in items]
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        """The class index of every sample, in order."""
        return [label for _, label in self.items]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the following samples get; call before iterating."""
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.items[index]
        try:
            image = load_image(path, self.max_pixels)
        except ImageDecodeError as e:
            logger.warning("skipping unreadable image %s", e)
            return None
        numpy_seed, python_seed = np.random.SeedSequence([self.seed, int(self._epoch), index]).spawn(2)
        self.transform.set_random_state(
            np.random.default_rng(numpy_seed), random.Random(int(python_seed.generate_state(1)[0]))
        )
        return self.transform(image=image)["image"], label


def collate_skip(
    batch: list[tuple[torch.Tensor, int] | None] | tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The one collate of finetune: samples to ``(inputs, labels, skipped)``, dropping the ``None`` of
    unreadable files.

    Args:
        batch: Samples ``(input, label)`` or ``None`` (`ImageDataset`, prediction's sources), or a batch a
            dataset already assembled with ``__getitems__`` as an ``(inputs, labels)`` pair of tensors (the
            feature cache's one fancy index per batch), passed through.

    Returns:
        ``(inputs, labels, skipped)``: the stacked inputs (N×3×H×W images, or N×F features), their labels
        (int64, N) and how many samples were dropped. When all were dropped, ``inputs`` and ``labels`` are
        empty (N = 0).
    """
    if isinstance(batch, tuple):
        inputs, labels = batch
        return inputs, labels, 0
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    images, labels = default_collate(kept)
    return images, labels, skipped
