"""`BatchPool`: DataLoader workers collate into shared-memory batch buffers they reuse once `DeviceBatches`
has handed them back, instead of into a new shared-memory file per batch; `worker_collate` picks it for a
loader. `shm_budget`: the workers and prefetch whose batches fit /dev/shm; `one_pass_loader`: the loader of
evaluation, extraction and prediction."""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from finetune._workers import worker_init
from finetune.data.datasets import DeviceBatches, collate_skip

log = logging.getLogger("finetune")

SHM_PATH = "/dev/shm"
_shm_noticed: set[tuple[int, int]] = set()
ONE_PASS_PREFETCH = 2
"""Batches each worker of a one-pass loader prefetches: the DataLoader's default."""


class Ticket(NamedTuple):
    """Which worker's buffer a :class:`BatchPool` batch is in: handed back with :meth:`BatchPool.release`."""

    worker: int
    pid: int
    index: int


class BatchPool:
    """`collate_skip` for DataLoader workers that writes each batch of images into a shared-memory buffer the
    worker made earlier and its consumer has handed back, instead of a new one.

    A DataLoader worker ships every batch in a new shared-memory file, and the kernel hands out and zeroes
    each of its pages again on the first write: about 5 ms for a batch of 32 images at 224 px on a 2-core VM,
    more than reading the same images from the pixel store takes. PyTorch has no pool of worker buffers (timm,
    FFCV and DALI avoid the cost with loaders of their own, not a DataLoader's workers), so it is written here.

    Each worker keeps up to ``slots`` buffers. A batch comes as ``(inputs, labels, skipped, ticket)``:
    ``inputs`` a view of a buffer, ``ticket`` a :class:`Ticket` naming it (flat ints: the DataLoader's pin-memory
    thread rebuilds a batch's tuples, as lists in older PyTorch). The consumer, `DeviceBatches`, calls
    :meth:`release` with the ticket once it no longer reads ``inputs`` (on CUDA when the batch is on the
    device; on the CPU when normalising made a new tensor of it), and :meth:`reclaim` when it starts an epoch:
    the DataLoader then drops the batches of an epoch left unfinished, so no one reads their buffers again.
    Both are written to the worker's pipe, which it reads before taking a buffer (a worker still making the
    dropped batches when it reads a reclaim keeps the buffer it takes next out until the following epoch).

    With no buffer free, or for a batch that is not images of one shape (features, or no sample read), the
    worker collates as `collate_skip` does, three items, into a new file: a pool costs at most ``slots``
    batches of shared memory per worker, and a consumer that hands nothing back loses only the speed-up. Keys
    carry the worker process's pid, so a key sent to a worker since replaced (workers that do not persist) is
    dropped, never reused.

    In the main process (no workers) it is `collate_skip`.

    Args:
        workers: the DataLoader's ``num_workers``.
        slots: buffers per worker; the DataLoader's ``prefetch_factor`` plus one covers the batches in flight.
    """

    RECLAIM = "reclaim"

    def __init__(self, workers: int, slots: int):
        # One pipe per worker, main process → worker: a message is written whole before release() returns (a
        # Queue's feeder thread could deliver it after the worker's next look), and never blocks the main process:
        # the write end does not wait, and a message the full pipe refuses is dropped (its buffer only stays out).
        self.slots = slots
        self.free = [multiprocessing.get_context().Pipe(duplex=False) for _ in range(workers)]
        for _, writer in self.free:
            try:
                os.set_blocking(writer.fileno(), False)
            except (OSError, ValueError, AttributeError):  # a platform whose pipes have no such mode: they block
                pass
        self._reset(None)

    def _reset(self, pid: int | None) -> None:
        self._pid = pid
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        self._idle: set[tuple[int, int]] = set()

    def __call__(self, batch):
        info = get_worker_info()
        if info is None or isinstance(batch, tuple):
            return collate_skip(batch)
        kept = [sample for sample in batch if sample is not None]
        images = [sample[0] for sample in kept]
        if not images or not all(isinstance(x, torch.Tensor) and x.shape == images[0].shape and
                                 x.dtype == images[0].dtype for x in images):
            return collate_skip(batch)
        if self._pid != os.getpid():  # a fresh worker: buffers are this process's own
            self._reset(os.getpid())
        shape = (len(images), *images[0].shape)
        found = self._take(info.id, images[0].dtype, math.prod(shape))
        if found is None:
            return collate_skip(batch)
        key, buffer = found
        inputs = buffer[:math.prod(shape)].view(shape)
        torch.stack(images, out=inputs)
        labels = default_collate([sample[1] for sample in kept])
        return inputs, labels, len(batch) - len(kept), Ticket(info.id, *key)

    def _take(self, worker: int, dtype: torch.dtype, numel: int) -> tuple[tuple[int, int], torch.Tensor] | None:
        """A free buffer of at least ``numel`` elements: one handed back (made anew if too small), a new one
        while this worker has fewer than ``slots``, else None."""
        reader = self.free[worker][0]
        while reader.poll():
            message = reader.recv()
            if message == self.RECLAIM:
                self._idle = set(self._buffers)
            elif message in self._buffers:  # else a key of an earlier process of this worker
                self._idle.add(message)
        if self._idle:
            key = self._idle.pop()
        elif len(self._buffers) < self.slots:
            key = (self._pid, len(self._buffers))
        else:
            return None
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype).share_memory_()
        return key, buffer

    def release(self, ticket: Ticket) -> None:
        """Hand a batch's buffer back to its worker: the caller reads its ``inputs`` no more."""
        worker, pid, index = ticket
        self._send(worker, (pid, index))

    def reclaim(self) -> None:
        """Hand every buffer back: call when an epoch starts, with no batch of an earlier one still read."""
        for worker in range(len(self.free)):
            self._send(worker, self.RECLAIM)

    def _send(self, worker: int, message) -> None:
        try:
            self.free[worker][1].send(message)
        except BlockingIOError:  # a worker that has not read its pipe for thousands of batches
            pass

    def __getstate__(self) -> dict:  # a worker starts with no buffers of its own
        return {**self.__dict__, "_pid": None, "_buffers": {}, "_idle": set()}


def reuses_buffers(device: torch.device | str, normalize: Callable | None) -> bool:
    """Whether `DeviceBatches` on ``device`` with ``normalize`` hands a :class:`BatchPool`'s buffers back: when
    it copies the batch to CUDA or normalises it into a new tensor."""
    return torch.device(device).type == "cuda" or normalize is not None


def worker_collate(workers: int, *, device: torch.device | str, normalize: Callable | None,
                   prefetch: int = ONE_PASS_PREFETCH) -> Callable:
    """The collate of a one-pass loader `DeviceBatches` reads (evaluation, extraction, prediction): a
    :class:`BatchPool` of ``prefetch`` buffers per worker where they come back (:func:`reuses_buffers`), else
    `collate_skip`. ``prefetch`` is the DataLoader's ``prefetch_factor`` (its default, 2): as many batches as the
    workers have in flight anyway, so the pool takes no more shared memory than PyTorch's own batches would
    (the training loader keeps one more per worker where /dev/shm has room)."""
    if workers and reuses_buffers(device, normalize):
        return BatchPool(workers, slots=prefetch)
    return collate_skip


def one_pass_loader(dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device | str,
                    normalize: Callable | None) -> DeviceBatches:
    """The loader of a pass over ``dataset`` in order (evaluation, extraction, prediction): its batches on
    ``device``, normalised there by ``normalize`` (`DeviceBatches`), the workers collating with
    :func:`worker_collate`. Workers and prefetch fit /dev/shm (:func:`shm_budget`, as the training loader's
    do): Docker's 64 MB takes two batches of 256 images at 224 px, and the workers die of a bus error beyond.
    The loader has a generator of its own, so the global RNG is left as it was."""
    device = torch.device(device)
    prefetch = ONE_PASS_PREFETCH
    if num_workers:
        num_workers, prefetch = shm_budget(num_workers, sample_batch_bytes(dataset, batch_size), prefetch=prefetch)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=worker_collate(num_workers, device=device, normalize=normalize, prefetch=prefetch),
                        prefetch_factor=prefetch if num_workers else None, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0))
    return DeviceBatches(loader, device, normalize)


def shm_budget(workers: int, batch_bytes: int, *, prefetch: int,
               shm: str = SHM_PATH, notice: bool = True) -> tuple[int, int]:
    """Workers and batches prefetched per worker whose batches fit in half of the free ``shm``.

    Worker batches travel through shared memory (``/dev/shm``): ``workers x prefetch`` of them at once.
    Docker gives containers 64 MB, which a few workers prefetching 224 px batches exceed (the loader then
    dies with a bus error). When they do not fit, prefetch fewer batches, then use fewer workers (none:
    load in the main process), with a one-line notice.

    Returns:
        ``(workers, prefetch)``; as given when ``shm`` cannot be read or has room.
    """
    try:
        stat = os.statvfs(shm)
    except OSError:
        return workers, prefetch
    budget = stat.f_bavail * stat.f_frsize // 2
    if workers * prefetch * batch_bytes <= budget:
        return workers, prefetch
    fit = budget // max(batch_bytes, 1)  # batches that fit at once
    new_prefetch = min(prefetch, fit // workers)
    new_workers = workers if new_prefetch else min(workers, fit)
    new_prefetch = max(new_prefetch, 1)
    if notice and (new_workers, new_prefetch) not in _shm_noticed:
        _shm_noticed.add((new_workers, new_prefetch))
        log.warning("%s has %d MB free, too little for %d workers x %d batches of %.1f MB: using %d workers x %d "
                    "(give the container more, e.g. docker run --shm-size=2g)", shm, 2 * budget >> 20, workers,
                    prefetch, batch_bytes / 2**20, new_workers, new_prefetch)
    return new_workers, new_prefetch


def sample_batch_bytes(dataset: Dataset, batch_size: int) -> int:
    """Bytes of one batch, from the first few samples that load (an unreadable one is ``None``)."""
    for i in range(min(len(dataset), 8)):
        sample = dataset[i]
        if sample is not None:
            tensors = [t for t in sample if isinstance(t, torch.Tensor)]
            return batch_size * sum(t.element_size() * t.nelement() for t in tensors)
    return 0
