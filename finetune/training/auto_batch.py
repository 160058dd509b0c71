"""``training.batch_size: auto``: the largest training batch of a stage that fits the GPU.

On CUDA, each stage's batch is searched for when the stage starts (a head-only stage on cached features fits far
more than one that trains the whole backbone): real forward and backward passes of the stage's trainable set on
random inputs of the stage's kind (images at the input size, or cached features), doubling from
:data:`START` until a pass runs out of memory or its peak, plus the optimizer's state (AdamW: two fp32 tensors per
trainable parameter, not allocated until the first step), exceeds ``fraction`` of the card's memory; then a
binary search between the last batch that fit and the first that did not. The result is capped at ``maximum`` and
at the training split's size, and recorded in the run folder (``auto_batch.json``), which a resumed run reads
instead of searching again, so it trains with the batches it started with.

The learning rate is **not** scaled with the batch found: the recipe's rates hold as written, at whatever batch
the card fits (the log line says so). On the CPU ``auto`` is :data:`DEFAULT_BATCH`, the documented default.

timm, Ultralytics (``batch=-1``), the Hugging Face Trainer (``auto_find_batch_size``) and Lightning
(``BatchSizeFinder``) do the same kind of search; none of them works on a finetune stage (a frozen backbone,
cached features), so :func:`search_batch_size` is written here, and tested with a fake memory limit.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from finetune._io import atomic_write_text
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

DEFAULT_BATCH = 32
"""``batch_size: auto`` on the CPU, and the batch size when none is given."""
START = 8
"""The first batch tried."""
RECORD_FILE = "auto_batch.json"
"""Stage index → the batch found, in the run folder."""


def search_batch_size(fits: Callable[[int], bool], *, maximum: int, start: int = START) -> int:
    """The largest batch ``b`` ≤ ``maximum`` with ``fits(b)``: doubling from ``start``, then bisecting between the
    last batch that fit and the first that did not (``fits`` is assumed monotone). Starts lower when ``start``
    does not fit.

    Raises:
        FinetuneError: not even a batch of 1 fits.
    """
    maximum = max(1, int(maximum))
    good, bad = 0, None
    b = min(start, maximum)
    while True:
        if fits(b):
            good = b
            if b >= maximum:
                return b
            b = min(2 * b, maximum)
        else:
            bad = b
            break
    if good == 0:  # the start batch did not fit: halve down to the first that does
        b = bad // 2
        while b >= 1 and not fits(b):
            bad, b = b, b // 2
        if b < 1:
            raise FinetuneError("training.batch_size auto: not even a batch of 1 fits in the GPU's memory; use a "
                                "smaller input size or model, or train fewer layers")
        good = b
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def memory_fits(model: nn.Module, trainable: Sequence[nn.Parameter], example: Callable[[int], torch.Tensor], *,
                fraction: float, device: torch.device, amp_dtype: torch.dtype | None,
                total_memory: int | None = None) -> Callable[[int], bool]:
    """``fits(b)`` for :func:`search_batch_size` on a CUDA ``device``: one forward and backward pass of ``model`` on
    ``example(b)`` (gradients of ``trainable`` only), fitting when it does not run out of memory and its peak
    allocation plus the optimizer state of ``trainable`` stays within ``fraction`` of ``total_memory`` (default the
    card's)."""
    total = total_memory if total_memory is not None else torch.cuda.get_device_properties(device).total_memory
    optimizer_state = 2 * sum(p.numel() * 4 for p in trainable)  # AdamW's exp_avg and exp_avg_sq, fp32

    def fits(batch: int) -> bool:
        for p in trainable:
            p.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(example(batch))
            out.float().sum().backward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        except torch.cuda.OutOfMemoryError:
            peak = None
        finally:
            for p in trainable:
                p.grad = None
            torch.cuda.empty_cache()
        return peak is not None and peak + optimizer_state <= fraction * total

    return fits


def find_batch(module: nn.Module, shape: Sequence[int], *, channels_last: bool, fraction: float,
               device: torch.device, amp_dtype: torch.dtype | None, maximum: int,
               total_memory: int | None = None) -> int:
    """The largest batch of random inputs of ``shape`` (C×H×W images, or a feature vector) whose forward and
    backward pass through ``module`` (its parameters that require gradients) fits ``fraction`` of the GPU's
    memory: :func:`memory_fits` searched by :func:`search_batch_size` up to ``maximum``, with ``module`` in
    training mode and its buffers (BatchNorm statistics) put back afterwards, so the search leaves no trace."""
    trainable = [p for p in module.parameters() if p.requires_grad]

    def example(batch: int) -> torch.Tensor:
        x = torch.randn(batch, *shape, device=device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    mode = module.training
    module.train()
    try:
        fits = memory_fits(module, trainable, example, fraction=fraction, device=device, amp_dtype=amp_dtype,
                           total_memory=total_memory)
        return search_batch_size(fits, maximum=maximum)
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        module.train(mode)


def recorded_batches(run_dir: Path) -> dict[int, int]:
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        return {int(k): int(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise FinetuneError(f"{path}: not a record of batch sizes ({e}); delete it to search again") from None


def record_batch(run_dir: Path, stage: int, batch: int) -> None:
    found = {**recorded_batches(run_dir), stage: batch}
    atomic_write_text(run_dir / RECORD_FILE, json.dumps({str(k): v for k, v in sorted(found.items())}, indent=2) + "\n")
