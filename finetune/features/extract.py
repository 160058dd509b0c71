"""Backbone features extracted from images: into RAM (`extract_features`) or streamed into a memory-mapped
file batch by batch (`extract_into`), whose written pages leave the resident set as extraction goes
(`release_pages`); `FeatureDataset` serves a cached array to the head's training loop."""
from __future__ import annotations

import ctypes
import mmap
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune._device import forward_batches
from finetune.data.batch_pool import one_pass_loader
from finetune.data.device_decode import device_decoding
from finetune.data.transforms import normalizer_of
from finetune.errors import FinetuneError

try:
    _LIBC = ctypes.CDLL(None)  # the C library the process runs on
except OSError:  # pragma: no cover - no dynamic C library to look into
    _LIBC = None


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


def extract_features(backbone, dataset, *, device, amp_dtype, batch_size: int, num_workers: int,
                     channels_last: bool = False, desc: str = "features",
                     device_decode: Optional[bool] = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features for every readable sample of ``dataset`` (BatchNorm in eval mode), in RAM;
    the cache streams them into its file with :func:`extract_into` instead. JPEGs through an eval pipeline are
    decoded in batches on CUDA (:func:`~finetune.data.device_decode.device_decoding`; ``device_decode`` forces
    it on or off)."""
    loader = _device_decoded(dataset, range(len(dataset)), device, batch_size, num_workers, device_decode)
    if loader is None:
        loader = one_pass_loader(dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                                 normalize=_normalizer(dataset))
    labels, feats, _ = forward_batches(backbone, loader, device=device, amp_dtype=amp_dtype,
                                       channels_last=channels_last, softmax=False)
    if not len(labels):
        raise FinetuneError(f"no readable image left to extract {desc} from ({len(dataset)} skipped)")
    return feats, labels


class _Indexed(Dataset):
    """Samples ``indices`` of ``dataset``, each labelled with its index: a batch says which rows it fills."""

    def __init__(self, dataset: Dataset, indices: range):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        sample = self.dataset[self.indices[i]]
        return None if sample is None else (sample[0], self.indices[i])


def release_pages(rows: np.ndarray) -> None:
    """Drop the pages of the memory map under ``rows`` from this process's resident set. Their data stays
    in the file's page cache (dirty pages of a shared mapping are written back by the kernel, and a later
    read maps them again), which the kernel can write out and reclaim; RSS no longer grows with the map.
    The C heap's free memory goes back to the system too (:func:`trim_heap`)."""
    mapped = getattr(rows, "_mmap", None)  # np.memmap and its views keep the mmap they were made from
    if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    trim_heap()


def trim_heap() -> None:
    """Return the free memory of the C heap to the system (glibc's ``malloc_trim``; nothing elsewhere).
    Decoding photos of many sizes, and the threads that fingerprint the files (each with its own malloc
    arena), leave freed memory resident that glibc keeps for reuse: measured on 4,000 photos, 27 MB of
    the 33 MB extraction held beyond its memory map's pages."""
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC is not None else None
    if trim is not None:
        trim(0)


def extract_into(rows: np.ndarray, backbone, dataset, *, indices: Optional[range] = None, device, amp_dtype,
                 batch_size: int, num_workers: int, channels_last: bool = False,
                 release_bytes: int = 8 << 20) -> np.ndarray:
    """Write the pooled backbone features of samples ``indices`` of ``dataset`` (default: all) into
    ``rows[i]`` batch by batch: into a float16 memory map, only one batch is ever held in RAM, and every
    ``release_bytes`` written the map's pages leave the resident set (:func:`release_pages`).

    Returns:
        The indices written, ascending; an unreadable sample's row is left as it was.
    """
    written, pending = [], [0]

    def sink(features: np.ndarray, index: np.ndarray) -> None:
        rows[index] = features  # cast to the file's dtype in place, no float32 copy of the split
        written.append(index)
        pending[0] += len(index) * rows[0].nbytes
        if pending[0] >= release_bytes:
            release_pages(rows)
            pending[0] = 0

    indices = range(len(dataset)) if indices is None else indices
    loader = _device_decoded(dataset, indices, device, batch_size, num_workers, None, by_index=True)
    if loader is None:
        loader = one_pass_loader(_Indexed(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                                 device=device, normalize=_normalizer(dataset))
    forward_batches(backbone, loader, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                    softmax=False, sink=sink)
    release_pages(rows)
    return np.concatenate(written) if written else np.zeros(0, dtype=np.int64)


def _normalizer(dataset: Dataset):
    """The batch normalisation of ``dataset``'s pipeline (uint8 samples), if it leaves one to its batches."""
    return normalizer_of(getattr(dataset, "transform", None))


def _device_decoded(dataset: Dataset, indices, device, batch_size: int, num_workers: int, enabled: Optional[bool],
                    *, by_index: bool = False):
    """Batches of samples ``indices`` (labelled with their label, or with their index when ``by_index``) decoded
    on the device, when ``dataset`` reads image files through an eval pipeline the device runs; else None."""
    if getattr(dataset, "store", True) is not None or not hasattr(dataset, "items"):  # a store, or not images
        return None
    items = [(dataset.items[i][0], i if by_index else dataset.items[i][1]) for i in indices]
    return device_decoding(items, dataset.transform, device=device, batch_size=batch_size, num_workers=num_workers,
                           enabled=enabled)
