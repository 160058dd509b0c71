"""What a stage reads: the run's manifest, split datasets (read from the decoded-pixel store, ``data.store``),
samplers and DataLoaders, and :class:`StageInputs`, what one stage trains and validates on.

Every loader batches with :func:`~finetune.data.collate_skip` and takes its workers from
:func:`~finetune._workers.auto_workers`: one policy for training, evaluation and prediction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune import _distributed as ddp
from finetune._io import cache_root as cache_path_root
from finetune._workers import auto_workers, worker_init
from finetune.data.batch_pool import sample_batch_bytes, shm_budget
from finetune.data import (
    BalancedSampler,
    BatchPool,
    DeviceBatches,
    ImageDataset,
    Manifest,
    collate_skip,
    manifest_root,
    prepare_manifest,
    reuses_buffers,
    build_store,
    preprocessing_transform,
    store_plan,
    write_digits,
)
from finetune.data.transforms import normalizer_of
from finetune.data.multilabel import is_labels_csv, read_labels_csv, split_labels
from finetune.data.prepare import DEFAULT_TEST, DEFAULT_VAL, split_options
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

PREFETCH_FACTOR = 4


@dataclass
class StageInputs:
    """What one stage trains and validates on.

    Attributes:
        module: what the stage trains (the model, or its head on cached features).
        train_loader: its training batches.
        val_loader: its validation batches (each rank reads its shard).
        eval_module: what validates (the EMA's copy of ``module`` when there is an EMA).
        mix: Mixup/CutMix of the training batches (:class:`~finetune.training.mixing.BatchMixer`), or None
            (always None on cached features).
    """

    module: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    eval_module: nn.Module
    mix: Optional[Callable] = None

    def set_epoch(self, epoch: int) -> None:
        """Reseed the sampler's shuffle and the dataset's augmentation (or feature view) for ``epoch``."""
        for obj in (self.train_loader.sampler, self.train_loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of w takes samples r, r + w, r + 2w, …: every sample once across ranks, no padding."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def run_manifest(path: Path, data, *, is_main: bool, dist: ddp.DistInfo, run_dir: Path):
    """The run's manifest at ``path``: made once (by rank 0, with ``bad_files.csv`` beside it) from the
    ``data`` section, then read by every rank; a resumed run reads the one it made, so the split never changes.
    A labels CSV (multi-label data, :mod:`finetune.data.multilabel`) gives a `LabelsTable`, split by iterative
    stratification when it has no split column.

    Raises:
        FinetuneError: no train or val split, or fewer than two classes.
    """
    source = data.manifest or data.root
    if source and is_labels_csv(source):
        root = manifest_root(data.root, data.manifest)
        if is_main and not path.exists():
            table = read_labels_csv(source, root=root)
            if not table.splits():
                table = split_labels(table, val=DEFAULT_VAL if data.val is None else data.val,
                                     test=DEFAULT_TEST if data.test is None else data.test, seed=data.seed)
            table.write_csv(path)
        ddp.barrier(dist)
        manifest = read_labels_csv(path, root=root)
    else:
        if is_main and not path.exists():
            if data.sample == "digits" and data.root:
                write_digits(data.root)
            made, _ = prepare_manifest(
                data.root, manifest=data.manifest, **split_options(data.model_dump()),
                report_path=path.parent / "bad_files.csv", report_shown_as=run_dir / "bad_files.csv",
            )
            made.write_csv(path)
        ddp.barrier(dist)
        manifest = Manifest.read_csv(path, root=manifest_root(data.root, data.manifest))
    if "train" not in manifest.splits() or "val" not in manifest.splits():
        found = ", ".join(manifest.splits())
        if data.val and "val" not in manifest.splits():  # data.val was given: too few images to take any
            largest = max(manifest.counts()[manifest.splits()[0]].values(), default=0)
            raise FinetuneError(
                f"the data needs train and val splits, found {found}: data.val is {data.val}, but no class "
                f"has enough usable images to give one to val (at most {largest} per class in "
                f"{manifest.splits()[0]}; a class needs 2 or more); add images, or give a validation folder"
            )
        raise FinetuneError(
            f"the data needs train and val splits, found {found} "
            "(give data.val, or a validation folder named val/valid/validation)"
        )
    if len(manifest.classes) < 2:
        raise FinetuneError(f"classification needs at least two classes; {data.root or data.manifest} has "
                            f"{len(manifest.classes)}: {', '.join(manifest.classes)}")
    return manifest


def split_dataset(items: list[tuple[Path, int]], transform: Callable, *, store, budget: Optional[int],
                  cache_dir: Optional[str], seed: int, dist: ddp.DistInfo) -> ImageDataset:
    """The dataset of a split's ``items`` through ``transform``, its images read from the decoded-pixel store
    where ``store`` (``data.store``) and the pipeline allow (:func:`~finetune.data.store_plan`), else from the
    files. The store is built (or found) once per machine by its local rank 0 while the others wait, then
    opened by all: a collective (a barrier) when storing, so call it on every rank."""
    plan, rest, why = store_plan(transform, store)
    if plan is None:
        if store != "off":
            log.info("pixel store not used: %s", why)
        return ImageDataset(items, transform, seed=seed)
    built = None
    if dist.local_rank == 0:
        built = build_store(items, plan, cache_dir=cache_path_root(cache_dir), workers=auto_workers("auto", 1),
                            budget=budget)
    ddp.barrier(dist)
    if built is None:  # local rank 0 built it: found, nothing decoded
        built = build_store(items, plan, cache_dir=cache_path_root(cache_dir), budget=budget)
    return ImageDataset(items, rest, seed=seed, store=built)


def make_loader(dataset: Dataset, *, sampler, batch_size: int, num_workers, device: torch.device,
                local_processes: int = 1, train: bool = False, reuse_buffers: bool = False) -> DataLoader:
    """A DataLoader batching with ``collate_skip``, with :func:`auto_workers` workers: this machine's CPUs
    shared between the ``local_processes`` ranks on it (torchrun's ``LOCAL_WORLD_SIZE``; the global world
    size would leave most cores idle on a cluster of many machines).

    With ``reuse_buffers`` (for a loader `DeviceBatches` reads: it hands the buffers back) the workers collate
    into shared-memory buffers they reuse (:class:`~finetune.data.BatchPool`, ``prefetch + 1`` batches each),
    where /dev/shm has room for them."""

    workers = auto_workers(num_workers, local_processes)
    prefetch = PREFETCH_FACTOR
    collate = collate_skip
    if workers:
        batch_bytes = sample_batch_bytes(dataset, batch_size)
        workers, prefetch = shm_budget(workers, batch_bytes, prefetch=prefetch)
        if reuse_buffers and workers and shm_budget(workers, batch_bytes, prefetch=prefetch + 1, notice=False) == \
                (workers, prefetch + 1):
            collate = BatchPool(workers, slots=prefetch + 1)
    # Workers persist across the epochs of a stage: the dataset keeps its epoch (which seeds the
    # augmentation) in shared memory, so set_epoch reaches them. The loader gets its own generator:
    # otherwise each new iterator draws its workers' base seed from the global RNG, and dropout in a
    # resumed run would see a different stream than in an uninterrupted one.
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=prefetch if workers else None,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0), worker_init_fn=worker_init,
        drop_last=drop_last_for(sampler, batch_size, train),
    )


def drop_last_for(sampler, batch_size: int, train: bool) -> bool:
    """Training drops an incomplete last batch (a batch of one breaks BatchNorm in training mode)
    unless that would leave no batch at all; evaluation sees every sample."""
    return train and len(sampler) > batch_size


def image_loader(dataset: ImageDataset, *, train: bool, balance: bool, seed: int, batch_size: int, num_workers,
                 dist: ddp.DistInfo, device: torch.device) -> DataLoader:
    """Batches of a split's dataset (:func:`split_dataset`): shuffled per epoch (class-balanced with
    ``balance``) for training, this rank's shard in order for validation; uint8 batches normalised on
    ``device`` (:class:`~finetune.data.DeviceBatches`)."""

    if train and balance:
        sampler = BalancedSampler(dataset.labels, seed=seed, num_replicas=dist.world_size, rank=dist.rank)
    elif train:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    normalize = normalizer_of(dataset.transform)
    loader = make_loader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers, device=device,
                         local_processes=dist.local_world_size, train=train,
                         reuse_buffers=reuses_buffers(device, normalize))
    return DeviceBatches(loader, device, normalize)


def feature_loaders(train: Dataset, val: Dataset, *, batch_size: int, eval_batch_size: int, seed: int,
                    dist: ddp.DistInfo) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached features (in the main process: a batch is one fancy index into a memory map)."""

    sampler = DistributedSampler(train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    train_loader = DataLoader(train, batch_size=batch_size, collate_fn=collate_skip, sampler=sampler,
                              generator=torch.Generator().manual_seed(0),
                              drop_last=drop_last_for(sampler, batch_size, True))
    val_loader = DataLoader(val, batch_size=eval_batch_size, collate_fn=collate_skip,
                            generator=torch.Generator().manual_seed(0),
                            sampler=ShardSampler(len(val), dist.rank, dist.world_size))
    return train_loader, val_loader


def uses_feature_cache(feature_cache: bool | str, head_only: bool, stage_mixup) -> bool:
    """Whether a stage may train on cached backbone features: a head-only stage whose ``feature_cache`` is not
    off and that mixes no batches of its own (Mixup/CutMix mixes images, not features)."""
    return feature_cache is not False and head_only and not stage_mixup


def feature_key_parts(model, preprocessing: dict, train_transforms, augment, store="off") -> dict:
    """What, besides the backbone's weights and the images, the cached features of a run depend on (the pixel
    store too: before a RandomResizedCrop it changes where the resizing happens)."""
    return {"backbone": model.backbone_name, "backbone_kwargs": model.backbone_kwargs,
            "preprocessing": preprocessing, "train_transforms": train_transforms,
            **({"augment": augment} if augment else {}), **({"store": store} if store != "off" else {})}


def stage_inputs(model, eval_model: nn.Module, *, cached: Optional[tuple[Dataset, Dataset]],
                 image_loader: Callable[..., DataLoader], mix, batch_size: int, eval_batch_size: int, seed: int,
                 dist: ddp.DistInfo) -> StageInputs:
    """What a stage trains on: the head on ``cached`` backbone features (train, val datasets, from
    `stage_features`), or, when there are none, images through the whole model (``image_loader(split,
    train=...)``), mixed by ``mix`` (Mixup/CutMix, or None).

    Args:
        model, eval_model: the :class:`~finetune.models.FinetuneModel` and what validates (its EMA, or itself).
    """
    if cached is not None:
        loaders = feature_loaders(*cached, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, dist=dist)
        return StageInputs(model.head, *loaders, eval_module=eval_model.head)
    return StageInputs(model, image_loader("train", train=True), image_loader("val", train=False), eval_model, mix)


def train_pipeline(preprocessing: dict, data) -> Callable:
    """The run's train pipeline: ``data.train_transforms`` (or the default ops), then ``data.augment``; uint8
    out, normalised on the device (:class:`~finetune.data.datasets.DeviceBatches`)."""

    return preprocessing_transform(preprocessing, train=True, ops=data.train_transforms, augment=as_plain(data.augment),
                                   device_normalize=True)


def as_plain(section):
    """A recipe section as plain data (pydantic models to dicts; other values as they are)."""
    return section.model_dump() if hasattr(section, "model_dump") else section
