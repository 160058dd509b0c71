"""Feature caching for head-only stages.

While a stage trains only the head, the frozen backbone maps each (image, augmentation) to the same
pooled features every epoch. So compute them once — inference mode, the run's precision, BatchNorm in
eval mode — and train the head from the cache: every epoch of that stage costs a pass over a small
matrix instead of the backbone's forward over every image.

``feature_cache_views: 0`` caches the eval transform (no augmentation); ``K >= 1`` caches K views made
with the train transform, and epoch ``e`` uses view ``e % K``.

The cache lives under ``cache_dir`` (default ``$FINETUNE_CACHE`` or ``~/.cache/finetune``) in a folder
named by a hash of the backbone weights, the preprocessing and augmentation settings, the views, the
seed, the precision and the manifest (paths, labels, file sizes and modification times). A change to
any of those makes a new folder; old folders are evicted, oldest first, to keep the total under
``cache_max_gb``. A stage whose cache alone would exceed the limit runs uncached. Arrays are ``.npy``
files read memory-mapped, written into a temporary folder that is renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune._version import __version__
from finetune.training import distributed as ddp
from finetune.training.loop import autocast

if TYPE_CHECKING:
    from finetune.training.runner import Runner

log = logging.getLogger("finetune")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "features"


def is_head_only(trainable: set[str]) -> bool:
    return bool(trainable) and all(name.startswith("head.") for name in trainable)


def cache_key(backbone: torch.nn.Module, settings: dict[str, Any], items: dict[str, list[tuple[Path, int]]]) -> str:
    """A hash of everything the cached features depend on."""
    h = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for split in sorted(items):
        for path, label in items[split]:
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{split}|{path}|{label}|{stamp}\n".encode())
    return h.hexdigest()[:24]


class FeatureDataset(Dataset):
    """Rows of a ``(views, N, F)`` feature array; ``set_epoch`` picks view ``epoch % views``.

    ``__getitems__`` serves a whole batch with one fancy index into the memory map, so the DataLoader
    makes one copy per batch instead of one tensor per sample."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = features, labels
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.features.shape[0]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        rows = np.asarray(indices)
        features = torch.from_numpy(np.asarray(self.features[self.view, rows], dtype=np.float32))
        return features, torch.from_numpy(self.labels[rows])


def collate_features(batch):
    features, labels = batch
    return features, labels, 0


@torch.inference_mode()
def extract_features(backbone, dataset, *, device, amp_dtype, batch_size: int, num_workers: int,
                     channels_last: bool = False, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features for every readable sample of ``dataset`` (BatchNorm in eval mode)."""
    from finetune.data import collate_skip

    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))  # leave the global RNG alone
    feats, labels = [], []
    for images, batch_labels, _ in loader:
        if batch_labels.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            out = backbone(images)
        feats.append(out.float().cpu())
        labels.append(batch_labels)
    backbone.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def cached_feature_inputs(runner: "Runner", stage, trainable: set[str]):
    """StageInputs that train the head on cached features, or None when the stage can't use the cache."""
    from finetune.data import ImageDataset
    from finetune.training.runner import (
        ShardSampler,
        StageInputs,
        auto_workers,
        drop_last_for,
    )

    if stage.feature_cache is False or not is_head_only(trainable):
        return None
    cfg = runner.cfg
    views = stage.feature_cache_views
    items = {"train": runner.items("train"), "val": runner.items("val")}
    n_rows = max(views, 1) * len(items["train"]) + len(items["val"])
    nbytes = n_rows * runner.model.num_features * 2  # stored as float16
    limit = int(cfg.cache_max_gb * 1024**3)
    if nbytes > limit:
        log.warning("feature cache would take %.1f GB > training.cache_max_gb; stage runs uncached", nbytes / 1024**3)
        return None

    settings = {
        "version": __version__, "backbone": runner.model.backbone_name, "preprocessing": runner.preprocessing,
        "train_transforms": runner.recipe.data.train_transforms, "views": views, "seed": cfg.seed,
        "amp": str(runner.amp_dtype), "channels_last": cfg.channels_last,
    }
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    folder = ddp.broadcast_object(cache_root / cache_key(runner.model.backbone, settings, items), runner.dist)
    workers = auto_workers(runner.recipe.data.num_workers, 1)
    batch = cfg.eval_batch_size or cfg.batch_size * 2

    # one process per machine computes; the others wait and read
    if runner.dist.local_rank == 0 and not (folder / "meta.json").is_file():
        start = time.perf_counter()

        def write(tmp: Path) -> None:
            train_views = []
            for view in range(max(views, 1)):
                transform = runner.train_transform if views else runner.eval_transform
                ds = ImageDataset(items["train"], transform, seed=cfg.seed)
                ds.set_epoch(view)
                feats, train_labels = extract_features(
                    runner.model.backbone, ds, device=runner.device, amp_dtype=runner.amp_dtype, batch_size=batch,
                    num_workers=workers, channels_last=cfg.channels_last)
                train_views.append(feats)
            np.save(tmp / "train.npy", np.stack(train_views).astype(np.float16))
            np.save(tmp / "train_labels.npy", train_labels)
            feats, val_labels = extract_features(
                runner.model.backbone, ImageDataset(items["val"], runner.eval_transform, seed=cfg.seed),
                device=runner.device, amp_dtype=runner.amp_dtype, batch_size=batch, num_workers=workers,
                channels_last=cfg.channels_last)
            np.save(tmp / "val.npy", feats[None].astype(np.float16))
            np.save(tmp / "val_labels.npy", val_labels)
            (tmp / "meta.json").write_text(json.dumps(settings, indent=2, default=str))

        _write_folder(folder, write)
        log.info("cached backbone features in %.1fs (%s)", time.perf_counter() - start, folder)
        evict(cache_root, limit, keep=folder)
    else:
        log.info("using cached backbone features (%s)", folder)
    ddp.barrier(runner.dist)
    os.utime(folder / "meta.json")  # mark as recently used for eviction

    train_ds = FeatureDataset(np.load(folder / "train.npy", mmap_mode="r"), np.load(folder / "train_labels.npy"))
    val_ds = FeatureDataset(np.load(folder / "val.npy", mmap_mode="r"), np.load(folder / "val_labels.npy"))
    world, rank = runner.dist.world_size, runner.dist.rank
    train_sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, collate_fn=collate_features, sampler=train_sampler,
        generator=torch.Generator().manual_seed(0), drop_last=drop_last_for(train_sampler, cfg.batch_size, True),
    )
    val_loader = DataLoader(val_ds, batch_size=batch, collate_fn=collate_features, generator=torch.Generator().manual_seed(0),
                            sampler=ShardSampler(len(val_ds), rank, world))
    return StageInputs(
        module=runner.model.head,
        train_loader=train_loader,
        val_loader=val_loader,
        eval_module=lambda: (runner.ema.module if runner.ema is not None else runner.model).head,
        datasets=[],
    )


def _write_folder(folder: Path, write) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            # another run finished the same cache first: its features are identical, keep them
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def evict(cache_root: Path, limit: int, keep: Optional[Path] = None) -> list[Path]:
    """Delete cache folders, least recently used first, until the total size is at most ``limit`` bytes."""
    entries = []
    for folder in cache_root.iterdir():
        meta = folder / "meta.json"
        if folder.is_dir() and meta.is_file():
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            entries.append((meta.stat().st_mtime, folder, size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
    return removed
