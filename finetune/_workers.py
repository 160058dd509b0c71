"""How many DataLoader worker processes decode images: one policy for training, evaluation and prediction."""
from __future__ import annotations

import argparse
import math
import os


def auto_workers(num_workers: int | str, world_size: int = 1) -> int:
    """``auto``: the CPU cores this process may use, shared between ranks, at most 8; a number as given."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // world_size))


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
