"""Datasets and batching: `ImageDataset`, the one collate `collate_skip`, `DeviceBatches`, class balance.

`DeviceBatches`: a loader's batches moved to the device (from pinned memory, ``non_blocking``) and
normalised there, the next batch's copy overlapping the current step on a CUDA side stream.

`DeviceBatches` also hands back the buffers of a `~finetune.data.batch_pool.BatchPool`: the workers'
`collate_skip` into shared-memory batches they reuse.

`ImageDataset`: decoded, augmented samples that skip unreadable files instead of crashing or substituting.

Class imbalance: per-class counts, loss weights from counts, and a class-balanced sampler.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, Sampler

from finetune.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from finetune.errors import FinetuneError

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
        items: (image path, class index) pairs, e.g. `Manifest.items`, or (image path, multi-hot float32
            vector) pairs of multi-label data (`LabelsTable.items`).
        transform: An albumentations pipeline (`build_transform`): called as
            ``transform(image=array)["image"]`` and re-seeded through its ``set_random_state``.
        seed: Non-negative augmentation seed.
        max_pixels: Largest width × height accepted.
        store: The items' decoded pixels (`~finetune.data.store.build_store`, in the order of ``items``):
            read instead of the files, with ``transform`` the pipeline `store_plan` returned for it.
    """

    def __init__(
        self,
        items: Sequence[tuple[str | os.PathLike, int]],
        transform: Callable,
        *,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        store=None,
    ):
        # a class index, or a multi-hot float32 vector (multi-label data)
        self.items = [(Path(path), label if isinstance(label, np.ndarray) else int(label)) for path, label in items]
        if store is not None and len(store) != len(self.items):
            raise FinetuneError(f"the pixel store holds {len(store)} images, the dataset {len(self.items)}")
        self.store = store
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._generators = None  # (numpy, Python) generators the pipeline draws from; see _reseed

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
        if self.store is not None:
            image = self.store[index]
            if image is None:  # counted once, when the store was built
                return None
        else:
            try:
                image = load_image(path, self.max_pixels)
            except ImageDecodeError as e:
                logger.warning("skipping unreadable image %s", e)
                return None
        self._reseed(index)
        return self.transform(image=image)["image"], label

    def _reseed(self, index: int) -> None:
        """Set the pipeline's two generators to this sample's own streams, drawn from ``(seed, epoch, index)``.

        Hand-written because numpy's recipe (``SeedSequence(...).spawn(2)`` and two new generators) costs
        about 45 µs a sample, a quarter of what a sample read from the pixel store costs in all. Here a
        blake2b digest of the three numbers is the sample's key: 128 bits of it the PCG64 state, 64 its
        (odd) stream increment, 64 the seed of Python's generator; distinct keys give unrelated streams, as
        SeedSequence's hashing does. The generators are made once per process and re-set in place (about
        7 µs); ``set_random_state`` still hands them to every step each time, so a step added to the
        pipeline, or a new pipeline, draws from them too.
        """
        key = hashlib.blake2b(f"{self.seed},{int(self._epoch)},{index}".encode(), digest_size=32).digest()
        if self._generators is None:
            self._generators = np.random.Generator(np.random.PCG64()), random.Random()
        numpy_generator, python_generator = self._generators
        numpy_generator.bit_generator.state = {
            "bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": int.from_bytes(key[:16], "little"), "inc": int.from_bytes(key[16:24], "little") | 1},
        }
        python_generator.seed(int.from_bytes(key[24:], "little"))
        self.transform.set_random_state(numpy_generator, python_generator)


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


class DeviceBatches:
    """The batches ``(inputs, labels, skipped)`` of ``loader`` with ``inputs`` on ``device``, normalised there
    by ``normalize`` (a :class:`~finetune.data.transforms.BatchNormalize` for uint8 batches; float ones pass).

    Workers then ship uint8 images: a quarter of float32's bytes through shared memory, pinned memory and
    the host-to-device copy, and no per-sample normalisation on the CPU. On CUDA the copy and normalisation of
    batch k+1 are queued on a side stream as soon as the loader hands it over, before batch k is yielded,
    so they overlap batch k's step (the idea of timm's ``PrefetchLoader``); each batch carries an event the
    compute stream waits on, and ``record_stream`` keeps its memory from being reused early. On the CPU the
    batch is normalised whole, in the calling process. ``labels`` stay where the loader left them (metrics
    gather them on the CPU; the train step moves them).

    A loader whose ``collate_fn`` is a :class:`~finetune.data.batch_pool.BatchPool` yields ``(inputs, labels,
    skipped, ticket)``; the ticket is released as soon as the batch made ready no longer shares the worker's
    buffer (on CUDA once it is copied to the device; on the CPU once normalised into a new tensor), the pool
    reclaims every buffer when an epoch starts, and the batch comes out as the usual three items.

    The wrapped loader's attributes (``sampler``, ``dataset``, ``batch_size``...) read through, so a stage
    reseeds its sampler and dataset as before.
    """

    def __init__(self, loader, device: torch.device | str, normalize: Callable | None = None):
        self.loader = loader
        self.device = torch.device(device)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _prepare(self, batch):
        inputs, labels, skipped, *ticket = batch
        received = inputs
        inputs = inputs.to(self.device, non_blocking=True)
        if self.normalize is not None:
            inputs = self.normalize(inputs)
        if ticket:  # a BatchPool buffer: handed back once what is yielded no longer reads it
            if inputs.device != received.device or inputs.untyped_storage().data_ptr() != \
                    received.untyped_storage().data_ptr():
                self.loader.collate_fn.release(ticket[0])
        return inputs, labels, skipped

    def __iter__(self):
        pool = getattr(self.loader, "collate_fn", None)
        if hasattr(pool, "reclaim"):  # a BatchPool: an unfinished epoch's batches are dropped, their buffers free
            pool.reclaim()
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._prepare(batch)
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                ready = self._prepare(batch)
                done = torch.cuda.Event()
                done.record(stream)
            if pending is not None:
                yield self._handed_over(*pending)
            pending = ready, done
        if pending is not None:
            yield self._handed_over(*pending)

    def _handed_over(self, batch, done):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        if batch[0].is_cuda:
            batch[0].record_stream(compute)
        return batch


def class_counts(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Number of samples of each class.

    Args:
        labels: Class index of every sample.
        num_classes: Number of classes (classes without samples count 0).

    Returns:
        int64 array of length ``num_classes``.

    Raises:
        FinetuneError: A label outside ``[0, num_classes)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise FinetuneError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return np.bincount(labels, minlength=num_classes)


def class_weights(counts: Sequence[int] | np.ndarray, mode: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights (e.g. ``CrossEntropyLoss(weight=...)``) from class counts.

    With ``n_c`` images of class ``c``:

    * ``inverse``: ``w_c ∝ 1 / n_c``.
    * ``effective``: ``w_c ∝ (1 - beta) / (1 - beta ** n_c)``, the inverse of the "effective number of
      samples" (Cui et al., *Class-Balanced Loss Based on Effective Number of Samples*, CVPR 2019).
      ``beta → 0`` gives equal weights, ``beta → 1`` approaches ``inverse``.

    Weights are then scaled so that their mean over the classes that have samples is 1, which keeps the
    loss on the scale of an unweighted one. A class without samples gets weight 0 (it is never a target).

    Args:
        counts: Samples per class (`class_counts`).
        mode: ``"inverse"`` or ``"effective"``.
        beta: The effective-number hyper-parameter, in [0, 1).

    Returns:
        float32 tensor of length ``len(counts)``.

    Raises:
        FinetuneError: Unknown mode, ``beta`` outside [0, 1), negative counts or no sample at all.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if (counts < 0).any() or not counts.any():
        raise FinetuneError("class counts must be non-negative with at least one sample")
    present = counts > 0
    weights = np.zeros_like(counts)
    if mode == "inverse":
        weights[present] = 1.0 / counts[present]
    elif mode == "effective":
        if not 0 <= beta < 1:
            raise FinetuneError(f"beta must lie in [0, 1), got {beta}")
        weights[present] = (1.0 - beta) / (1.0 - beta ** counts[present])
    else:
        raise FinetuneError(f"unknown class weight mode {mode!r} (expected 'inverse' or 'effective')")
    weights *= present.sum() / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


class BalancedSampler(Sampler[int]):
    """Draws every class equally often, whatever its size.

    Each epoch, ``num_samples`` draws are shared equally among the classes that have samples (the
    remainder going to randomly chosen classes); within a class, its samples are drawn in a random order
    without replacement, starting a new random order when they run out, so a sample is drawn at most
    once more than any other of its class. The draws are then shuffled. The order depends only on
    ``seed`` and the epoch given to `set_epoch`.

    For distributed training every rank builds the same sampler with its ``rank``: each epoch's draws
    are padded to a multiple of ``num_replicas`` (by drawing that many more) and rank ``r`` takes every
    ``num_replicas``-th draw starting at ``r``.

    Args:
        labels: Class index of every sample (e.g. `ImageDataset.labels`).
        num_samples: Draws per epoch over all ranks; defaults to ``len(labels)``.
        seed: Sampling seed.
        num_replicas: Number of distributed ranks.
        rank: This rank.
    """

    def __init__(
        self,
        labels: Sequence[int],
        *,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise FinetuneError("BalancedSampler needs at least one sample")
        if not 0 <= rank < num_replicas:
            raise FinetuneError(f"rank must lie in [0, {num_replicas}), got {rank}")
        num_samples = len(labels) if num_samples is None else num_samples
        if num_samples < 1:
            raise FinetuneError(f"num_samples must be positive, got {num_samples}")
        self._by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.total = math.ceil(num_samples / num_replicas) * num_replicas
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws `__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_class = np.full(len(self._by_class), self.total // len(self._by_class))
        per_class[rng.choice(len(self._by_class), self.total % len(self._by_class), replace=False)] += 1
        draws = []
        for members, quota in zip(self._by_class, per_class):
            rounds = max(1, math.ceil(quota / len(members)))
            draws.append(np.concatenate([rng.permutation(members) for _ in range(rounds)])[:quota])
        order = rng.permutation(np.concatenate(draws))
        return iter(order[self.rank :: self.num_replicas].tolist())
