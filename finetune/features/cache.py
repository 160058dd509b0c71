"""Feature caching for head-only stages.

While a stage trains only the head, the frozen backbone maps each (image, augmentation) to the same
pooled features every epoch. So compute them once — inference mode, the run's precision, BatchNorm in
eval mode — and train the head from the cache: every epoch of that stage costs a pass over a small
matrix instead of the backbone's forward over every image.

``feature_cache_views: 0`` caches the eval transform (no augmentation); ``K >= 1`` caches K views made
with the train transform, and epoch ``e`` uses view ``e % K``.

The cache lives under ``cache_dir`` (default ``$FINETUNE_CACHE`` or ``~/.cache/finetune``) in a folder
named by a hash of the backbone weights and ``backbone_kwargs`` (e.g. ``global_pool``), the
preprocessing and augmentation settings, the views, the seed, the precision, the code that decodes and
transforms images (:func:`code_fingerprint`) and the manifest: paths, labels and a fingerprint of each
file (:func:`file_fingerprint`). A change to any of those makes a new folder; old folders are evicted,
least recently used first, to keep the total under ``cache_max_gb``. A stage whose cache alone would
exceed the limit runs uncached.

Arrays are ``.npy`` files read memory-mapped. Extraction streams each batch into float16 memory-mapped
files (no float32 copy of a split in RAM), shared between the processes of a machine under DDP (each
writes its block of rows); they are written into a temporary folder that is renamed into place
when complete. The pages written are handed back to the kernel as extraction goes (:func:`release_pages`):
a large cache is never resident in the process, only in the page cache. ``meta.json``, written last, lists
every file with its size, and a folder counts as a cache entry only when all of them are there (:func:`is_complete`). Eviction renames a folder away before
deleting it, so a process killed mid-delete leaves no folder under a key, and the next eviction finishes
the delete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import albumentations
import cv2
import numpy as np
import PIL
import timm
import torch
from torch.utils.data import Dataset

from finetune import _distributed as ddp
from finetune._io import cache_path, make_temp_dir
from finetune._version import __version__
from finetune.data import ImageDataset
from finetune.errors import FinetuneError
from finetune.features.extract import FeatureDataset, extract_into
from finetune.models.factory import pooled_width

log = logging.getLogger("finetune")


def features_folder(cache_dir: str | os.PathLike | None) -> Path:
    """Where feature cache entries live: ``features/`` under the cache root (`finetune._io.cache_path`)."""
    return cache_path("features", cache_dir)


def cache_key(backbone: torch.nn.Module, settings: dict[str, Any], items: dict[str, list[tuple[Path, int]]]) -> str:
    """A hash of everything the cached features depend on: the backbone's weights, ``settings`` and, for
    every item, its split, path, label and :func:`file_fingerprint`."""
    h = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for split in sorted(items):
        paths = [path for path, _ in items[split]]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # small reads: I/O bound
            stamps = list(pool.map(file_fingerprint, paths))
        for (path, label), stamp in zip(items[split], stamps):
            label = label.tolist() if isinstance(label, np.ndarray) else label  # multi-hot: every value
            h.update(f"{split}|{path}|{label}|{stamp}\n".encode())
    return h.hexdigest()[:24]


FINGERPRINT_BYTES = 4096
"""How much of each end of an image file :func:`file_fingerprint` hashes."""

def file_fingerprint(path: str | os.PathLike) -> str:
    """Size, modification time and a hash of the first and last 4 KiB of a file (all of a small one).

    Hashing whole files would read the whole data set at every start, as much I/O as the extraction the
    cache saves. Two small reads per file cost about as much as the ``stat`` and still see rewritten
    content that kept its size and time stamp (copies with ``cp -p``, ``rsync -t``, archives): the head
    holds the dimensions, EXIF orientation and JPEG tables, the tail the end of the compressed stream,
    which a change anywhere in a JPEG's Huffman-coded scan shifts, and a PNG's CRC and Adler-32 over its
    whole pixel data.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(FINGERPRINT_BYTES)
            if st.st_size > 2 * FINGERPRINT_BYTES:
                f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            tail = f.read(FINGERPRINT_BYTES)
    except OSError:
        return "missing"
    digest = hashlib.blake2b(head + tail, digest_size=12).hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}:{digest}"


def code_fingerprint() -> dict[str, str]:
    """The code that turns image files into features, beyond the backbone's weights: the versions of the
    libraries that decode (OpenCV, Pillow), transform (albumentations, NumPy) and run the backbone (timm,
    torch), and a hash of finetune's own decoding, transform, model and extraction source (its version
    string is not bumped for every change)."""

    package = Path(__file__).resolve().parents[1]
    source = hashlib.sha256()
    for file in [*sorted((package / "data").rglob("*.py")), *sorted((package / "models").rglob("*.py")),
                 *sorted((package / "features").rglob("*.py"))]:
        source.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return {
        "finetune": __version__, "finetune_source": source.hexdigest()[:16], "torch": torch.__version__,
        "timm": timm.__version__, "albumentations": albumentations.__version__, "cv2": cv2.__version__,
        "PIL": PIL.__version__, "numpy": np.__version__,
    }


def write_meta(folder: Path, settings: dict[str, Any], extracted: Optional[list[int]] = None) -> None:
    """Write ``meta.json`` last: the settings, the size of every other file (for :func:`is_complete`) and
    how many images each process of the machine extracted."""
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != "meta.json"}
    meta = {"settings": settings, "files": files, "extracted_by_rank": extracted}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a whole cache entry: its ``meta.json`` and every file it lists, at its size."""
    try:
        files = json.loads((folder / "meta.json").read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached_features(backbone, items: list[tuple[Path, int]], transform, *, settings: dict[str, Any],
                    cache_dir: str | os.PathLike | None, device, amp_dtype=None, batch_size: int = 64,
                    num_workers: int = 0, max_bytes: int = 8 * 1024**3) -> tuple[np.ndarray, bool]:
    """Pooled eval-transform features of every item, from the cache or extracted once and cached there.

    The same cache as training's head-only stages (keyed by :func:`cache_key` over the backbone's weights,
    ``settings`` plus :func:`code_fingerprint`, and the items), for callers outside a run, such as
    ``finetune data audit``. An unreadable item raises rather than shifting the rows.

    Returns:
        ``(features, cached)``: an ``N×F`` float32 array in the order of ``items``, and whether it came
        from the cache.
    """

    settings = {"code": code_fingerprint(), **settings}
    root = features_folder(cache_dir)
    folder = root / cache_key(backbone, settings, {"all": items})
    cached = is_complete(folder)
    if not cached:
        def write(tmp: Path) -> None:
            rows = np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float16, (len(items), pooled_width(backbone)))
            written = extract_into(rows, backbone, ImageDataset(items, transform), device=device, amp_dtype=amp_dtype,
                                   batch_size=batch_size, num_workers=num_workers)
            rows.flush()
            del rows
            if len(written) != len(items):
                raise FinetuneError(f"{len(items) - len(written)} image(s) became unreadable while extracting features")
            write_meta(tmp, settings)

        _write_folder(folder, write)
        evict(root, max_bytes, keep=folder)
    os.utime(folder / "meta.json")  # mark as recently used for eviction
    return np.load(folder / "features.npy").astype(np.float32), cached


def stage_features(
    backbone: torch.nn.Module,
    items: dict[str, list[tuple[Path, int]]],
    *,
    datasets: dict[str, Dataset],
    views: int,
    key_parts: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    max_bytes: int,
    num_features: int,
    dist: ddp.DistInfo,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    seed: int,
    batch_size: int,
    num_workers: int,
    channels_last: bool = False,
) -> Optional[tuple[FeatureDataset, FeatureDataset]]:
    """The train and val features of a head-only stage, from the cache or extracted once into it.

    Args:
        backbone: the frozen backbone (images → pooled features).
        items: ``(path, label)`` of the ``train`` and ``val`` splits.
        datasets: the ``train`` and ``val`` images (`ImageDataset` over ``items``): train through the train
            pipeline for ``views >= 1`` augmented views (epoch ``v`` gives view ``v``), else the eval pipeline.
        views: 0 (the eval transform) or K augmented views; epoch ``e`` trains on view ``e % K``.
        key_parts: what else the features depend on (backbone name and kwargs, preprocessing, the
            recipe's train transforms); the cache key adds the code, views, seed and precision.
        cache_dir: the cache folder (None: the default, see :func:`features_folder`).
        max_bytes: the cache's size limit; a stage whose features alone exceed it runs uncached.
        num_features: the backbone's feature width.
        dist: the process group: the processes of each machine share its extraction, then all read.
        device, amp_dtype, channels_last: how the backbone runs.
        seed: the augmentation seed.
        batch_size, num_workers: the extraction's loader.

    Returns:
        ``(train, val)`` datasets of ``(features, label)``, or None when the features would exceed
        ``max_bytes``.
    """
    n_rows = max(views, 1) * len(items["train"]) + len(items["val"])
    nbytes = n_rows * num_features * 2  # stored as float16
    if nbytes > max_bytes:
        log.warning("feature cache would take %.1f GB > training.cache_max_gb; stage runs uncached", nbytes / 1024**3)
        return None
    settings = {"code": code_fingerprint(), **key_parts, "views": views, "seed": seed, "amp": str(amp_dtype),
                "channels_last": channels_last}
    root = features_folder(cache_dir)
    key = cache_key(backbone, settings, items) if dist.is_main else None
    folder = root / ddp.broadcast_object(key, dist)

    # the processes of a machine share the extraction: its local rank 0 makes the files, each process
    # writes its share of the rows, then local rank 0 checks and publishes the folder
    leader = dist.rank - dist.local_rank
    tmp = None
    if dist.local_rank == 0 and not is_complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(folder.parent, prefix=f".{folder.name}.tmp-")
        for split, n_views in (("train", max(views, 1)), ("val", 1)):
            np.lib.format.open_memmap(tmp / f"{split}.npy", "w+", np.float16, (n_views, len(items[split]), num_features))
    tmp = ddp.all_gather_objects(tmp and str(tmp), dist)[leader]
    if tmp is not None:
        start = time.perf_counter()
        tmp = Path(tmp)
        try:
            written, error = _extract_share(tmp, backbone, items, views=views, datasets=datasets,
                                            seed=seed, share=(dist.local_rank, dist.local_world_size), device=device,
                                            amp_dtype=amp_dtype, batch_size=batch_size, num_workers=num_workers,
                                            channels_last=channels_last), None
        except Exception as e:  # tell the other processes, which would otherwise wait forever
            written, error = None, e
        shares = ddp.all_gather_objects((written, error and f"{type(error).__name__}: {error}"), dist)
        shares = shares[leader:leader + dist.local_world_size]
        failed = [message for _, message in shares if message]
        if dist.local_rank == 0:
            try:
                if failed:
                    raise FinetuneError(failed[0])
                _finish(tmp, items, [w for w, _ in shares], settings)
                _publish(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("cached backbone features in %.1fs (%s)", time.perf_counter() - start, folder)
            evict(root, max_bytes, keep=folder)
        if error is not None:
            raise error
        if failed:
            raise FinetuneError(f"feature extraction failed in another process: {failed[0]}")
    else:
        log.info("using cached backbone features (%s)", folder)
    ddp.barrier(dist)
    os.utime(folder / "meta.json")  # mark as recently used for eviction
    return tuple(FeatureDataset(np.load(folder / f"{split}.npy", mmap_mode="r"), np.load(folder / f"{split}_labels.npy"))
                 for split in ("train", "val"))


_KEY = re.compile(r"[0-9a-f]{24}")
_EVICTED = re.compile(r"\.[0-9a-f]{24}\.evict-[0-9a-f]+")


def _extract_share(tmp: Path, backbone, items: dict[str, list[tuple[Path, int]]], *, views: int,
                   datasets: dict[str, Dataset], seed: int, share: tuple[int, int],
                   **run) -> dict[str, np.ndarray]:
    """Extract share ``(i, n)`` of the rows of ``tmp/train.npy`` (every view) and ``tmp/val.npy``: the
    ``i``-th of ``n`` contiguous blocks of each split.

    Returns:
        The rows written per split (of the train split: those every view wrote).
    """

    i, n = share
    written = {}
    for split in ("train", "val"):
        rows = np.load(tmp / f"{split}.npy", mmap_mode="r+")
        block = range(len(items[split]) * i // n, len(items[split]) * (i + 1) // n)
        for view in range(rows.shape[0]):
            dataset = datasets[split]
            dataset.set_epoch(view)
            done = extract_into(rows[view], backbone, dataset, indices=block, **run)
            if view and not np.array_equal(done, written[split]):
                raise FinetuneError(f"images of the {split} split became unreadable while extracting features")
            written[split] = done
        rows.flush()
        del rows
    return written


def _finish(tmp: Path, items: dict[str, list[tuple[Path, int]]], shares: list[dict[str, np.ndarray]],
            settings: dict[str, Any]) -> None:
    """Complete the folder ``tmp`` the processes extracted ``shares`` into: drop the rows of unreadable
    images, write the labels and ``meta.json``."""
    for split in ("train", "val"):
        kept = np.sort(np.concatenate([share[split] for share in shares]))
        if not len(kept):
            raise FinetuneError(f"no readable image left to extract {split} split features from "
                                f"({len(items[split])} skipped)")
        if len(kept) < len(items[split]):
            _keep_rows(tmp / f"{split}.npy", kept)
        labels = [items[split][i][1] for i in kept]  # class indices, or multi-hot vectors (multi-label)
        multi = bool(labels) and isinstance(labels[0], np.ndarray)
        np.save(tmp / f"{split}_labels.npy", np.stack(labels).astype(np.float32) if multi else np.array(labels, dtype=np.int64))
    write_meta(tmp, settings, extracted=[int(sum(len(w) for w in share.values())) for share in shares])


def _keep_rows(path: Path, kept: np.ndarray, chunk_bytes: int = 16 << 20) -> None:
    """Rewrite the ``(views, N, F)`` array at ``path`` with only rows ``kept``, ``chunk_bytes`` at a time."""
    old = np.load(path, mmap_mode="r")
    chunk = max(1, chunk_bytes // (old.shape[0] * old.shape[2] * old.itemsize))
    part = path.with_name(f"{path.stem}.part.npy")
    new = np.lib.format.open_memmap(part, "w+", old.dtype, (old.shape[0], len(kept), old.shape[2]))
    for start in range(0, len(kept), chunk):
        new[:, start:start + chunk] = old[:, kept[start:start + chunk]]
    new.flush()
    del new, old
    os.replace(part, path)


def _write_folder(folder: Path, write) -> None:
    """Make cache entry ``folder`` by ``write(tmp)`` into a temporary sibling renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, prefix=f".{folder.name}.tmp-")
    try:
        write(tmp)
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the complete ``tmp`` to ``folder``: an incomplete folder under that name is discarded first, a
    complete one another run made meanwhile kept (``tmp`` is then deleted)."""
    if folder.exists() and not is_complete(folder):
        _delete(folder)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not is_complete(folder):
            raise
        # another run finished the same cache first: its features are identical, keep them
        shutil.rmtree(tmp, ignore_errors=True)


def _delete(folder: Path) -> None:
    """Rename ``folder`` to a hidden ``.NAME.evict-*`` sibling, then delete it: a kill mid-delete leaves
    no partial folder under its key (:func:`evict` removes the leftover)."""
    doomed = folder.with_name(f".{folder.name}.evict-{secrets.token_hex(4)}")
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:
        return  # another process deleted it
    shutil.rmtree(doomed, ignore_errors=True)


def evict(cache_root: Path, limit: int, keep: Optional[Path] = None) -> list[Path]:
    """Delete cache entries, least recently used first, until their total size is at most ``limit`` bytes.

    Only folders named like a key are touched (``cache_dir`` may hold other things). Incomplete ones and
    the leftovers of an interrupted eviction are deleted whatever the total."""
    entries, removed = [], []
    for folder in cache_root.iterdir():
        if not folder.is_dir():
            continue
        if _EVICTED.fullmatch(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
        elif _KEY.fullmatch(folder.name) and folder != keep:
            if is_complete(folder):
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                entries.append(((folder / "meta.json").stat().st_mtime, folder, size))
            else:
                _delete(folder)
                removed.append(folder)
    total = sum(size for _, _, size in entries)
    if keep is not None and is_complete(keep):
        total += sum(f.stat().st_size for f in keep.iterdir() if f.is_file())
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        _delete(folder)
        total -= size
        removed.append(folder)
    return removed
