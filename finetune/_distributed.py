"""torchrun DDP helpers: one process per device, rank 0 writes files."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from finetune._device import resolve_device
from finetune.errors import FinetuneError
from finetune._device import configure_cuda


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout: Optional[timedelta] = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for a single process).

    ``timeout`` bounds every collective (a barrier included): ranks that wait longer for the others fail
    instead of hanging. It must cover the longest work one rank does alone (e.g. rank 0 writing a
    checkpoint or test report); NCCL's default is 10 minutes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world_size,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def rank_device(device: str, info: DistInfo) -> torch.device:
    """The device this process trains on: ``training.device`` resolved for its rank.

    Under torchrun (several processes) each rank takes ``cuda:LOCAL_RANK``; ``cuda:N`` would put every
    rank on GPU N, so it is refused (choose the GPUs with ``CUDA_VISIBLE_DEVICES``).
    """
    if info.enabled and re.fullmatch(r"cuda:\d+", device):
        raise FinetuneError(
            f"training.device is {device}, but torchrun started {info.world_size} processes and each needs its "
            "own GPU: use device: cuda or auto (rank r takes cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return resolve_device(device, info.local_rank, setting="training.device")


def join(device: str, timeout: Optional[timedelta] = None, deterministic: bool = False) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and take this process's device for ``device``
    (``training.device``; made the current CUDA device, with the CUDA defaults of ``training/cuda.py``;
    ``deterministic`` keeps cuDNN's autotuner off)."""
    device_type = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    info = init_distributed(device_type, timeout=timeout)
    resolved = rank_device(device, info)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    configure_cuda(resolved, deterministic=deterministic)
    return info, resolved


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun (gradients all-reduced), else as it is."""
    if not info.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Under DDP, replace every floating-point buffer of ``module`` (BatchNorm's running statistics) by its
    mean over the ranks, in one all-reduce.

    DDP all-reduces gradients only: each rank's BatchNorm layers update their running statistics from
    their own share of the batch, so the ranks' buffers, and an EMA averaging them, drift apart (DDP then
    broadcasts rank 0's at the next forward, dropping the other ranks' batches). Their mean is what one
    process would compute from the whole global batch (exactly for the running mean). A no-op outside
    a process group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
