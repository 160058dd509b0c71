"""How many CPUs parallel work may use (:func:`usable_cpus`), how many DataLoader worker processes decode
images (one policy for training, evaluation and prediction), and how those processes start
(:func:`worker_init`)."""
from __future__ import annotations

import argparse
import ctypes
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup file system is mounted: what :func:`usable_cpus` reads unless given another folder."""


def usable_cpus(cgroup_root: str | os.PathLike | None = None) -> int:
    """The CPUs this process may actually use: its affinity mask (``taskset``, ``docker --cpuset-cpus``),
    capped by the cgroup CPU quota (``docker --cpus``, Kubernetes limits; v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) rounded up, at least 1. ``os.cpu_count()`` counts the
    machine's CPUs, which a container may be allowed a fraction of. Every place that sizes parallel work
    asks this function."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(Path(cgroup_root or CGROUP_ROOT))
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in CPUs (quota / period) of cgroup v2 or v1, or None when unlimited or unreadable."""
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        fields = []
        try:
            fields = [(root / "cpu" / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        except OSError:
            return None
    if len(fields) != 2 or fields[0] in ("max", "-1"):
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


WORKER_MMAP_THRESHOLD = 32 << 20
"""Bytes from which a worker's malloc maps a block of its own (glibc's dynamic threshold stops there too)."""
WORKER_TRIM_THRESHOLD = 64 << 20
"""Free bytes at the top of a worker's heap before malloc hands them back to the kernel."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def worker_init(worker_id: int) -> None:
    """The ``worker_init_fn`` of finetune's image loaders: :func:`keep_freed_memory` in each worker."""
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Let this process's malloc reuse the memory it frees instead of handing it back to the kernel.

    A DataLoader worker allocates a batch of images (150 KB each at 224 px: decoded pixels, each op's output,
    the tensor), frees them all after the collate, and starts again. glibc's defaults return such a block of
    freed memory to the kernel (a trim of the heap's top, or an unmap), so the next batch's arrays page-fault
    on every 4 KB page they touch: about 36 faults per 224 px sample, a fifth of a sample's time from the pixel
    store in benchmarks/bench_loader.py. No library has this knob (PyTorch suggests preloading jemalloc or
    tcmalloc, which a user has to install and set up), so it is ``mallopt`` through ctypes: blocks below
    :data:`WORKER_MMAP_THRESHOLD` come from the heap, and up to :data:`WORKER_TRIM_THRESHOLD` of free heap is
    kept. A worker's heap then stays at the size of the batches it has in hand.

    Returns:
        Whether both settings were applied (False where the C library has no ``mallopt``: macOS, Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD,
                                                                               WORKER_TRIM_THRESHOLD) == 1


def auto_workers(num_workers: int | str, world_size: int = 1) -> int:
    """``auto``: the CPUs this process may use (:func:`usable_cpus`), shared between ranks, at most 8; a number
    as given."""
    if num_workers != "auto":
        return int(num_workers)
    return max(0, min(8, usable_cpus() // world_size))


def inference_workers(num_workers: int | str, num_samples: int, batch_size: int) -> int:
    """Workers for one pass over ``num_samples`` (evaluation, prediction): :func:`auto_workers`, at most
    one per batch, and none for a single batch (there is nothing to overlap its decoding with)."""
    batches = math.ceil(num_samples / batch_size)
    return 0 if batches <= 1 else min(auto_workers(num_workers), batches)


def workers_arg(value: str) -> int | str:
    """``argparse`` type of ``--num-workers``: ``auto`` or a count."""
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be auto or a number of processes (0 or more), got '{value}'")
    return count
