"""Where and how a model runs: the device, the precision, autocast, and the one batched forward pass.

Training, validation, evaluation, prediction and feature extraction all resolve their device with
:func:`resolve_device` and run a model over a loader with :func:`forward_batches`: one implementation of
each, below every layer that uses them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from finetune.errors import FinetuneError


def resolve_device(device: str | torch.device, local_rank: Optional[int] = None, *,
                   setting: str = "device") -> torch.device:
    """The ``torch.device`` for a device setting.

    ``auto`` is CUDA when available, else the CPU; with a ``local_rank`` (training) ``auto`` and ``cuda``
    mean ``cuda:LOCAL_RANK``, without one plain ``cuda``. Anything else is taken as ``torch.device`` does.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``.
        local_rank: the process's rank on its machine (training), or ``None``.
        setting: what the error messages call the setting (``training.device``, ``device``).

    Raises:
        FinetuneError: an unknown device, or CUDA asked for where there is none.
    """
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise FinetuneError(f"unknown {setting} {device!r}: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"{setting} is {device} but no CUDA device is available: CUDA is not available "
                            "to torch here (use auto or cpu)")
    if resolved.type == "cuda" and resolved.index is None and local_rank is not None:
        return torch.device(f"cuda:{local_rank}")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device``; None means fp32 (no autocast).

    auto: bf16 on CUDA devices with native bf16 (compute capability 8.0 or newer: Ampere, Hopper, …), else
    fp16 with a GradScaler (T4, V100: ``torch.cuda.is_bf16_supported()`` says yes there too, but emulates
    it, slowly); fp32 on the CPU. bf16/fp16 on the CPU are used only when asked for.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """The one mixed-precision context: a no-op when ``amp_dtype`` is None."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


@torch.inference_mode()
def forward_batches(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    softmax: bool = True,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    sink: Optional[Callable[[np.ndarray, np.ndarray], None]] = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Run ``model`` (in eval mode, restored afterwards) over every batch of ``loader``.

    Args:
        model: inputs → outputs (logits or features), on ``device``.
        loader: batches of ``(inputs, labels, skipped)`` (:func:`~finetune.data.collate_skip`).
        device: where the model runs.
        amp_dtype: autocast dtype, or None for full precision.
        channels_last: feed 4-d inputs in channels-last memory format.
        softmax: softmax probabilities (the default), else the raw outputs (features).
        progress: wraps the batch iterator, e.g. ``tqdm``.
        sink: called with each batch's ``(outputs, labels)`` (float32 and int64 arrays) instead of keeping
            them: the feature cache streams them into a memory map.

    Returns:
        ``(labels, outputs, skipped)``: int64 array (N,), float32 array (N, C) (``(0, 0)`` when no sample
        was read, or with a ``sink``), and the number of samples the loader skipped.
    """
    was_training = model.training
    model.eval()
    all_labels, all_outputs, skipped = [], [], 0
    try:
        for inputs, labels, batch_skipped in (progress(loader) if progress else loader):
            skipped += batch_skipped
            if labels.numel() == 0:
                continue
            inputs = inputs.to(device, non_blocking=True)
            if channels_last and inputs.ndim == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                outputs = model(inputs)
            outputs = (outputs.float().softmax(1) if softmax else outputs.float()).cpu()
            if sink is not None:
                sink(outputs.numpy(), labels.numpy().astype(np.int64))
                continue
            all_outputs.append(outputs)
            all_labels.append(labels)
    finally:
        model.train(was_training)
    if not all_labels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32), skipped
    return torch.cat(all_labels).numpy().astype(np.int64), torch.cat(all_outputs).numpy(), skipped


def configure_cuda(device: torch.device, *, deterministic: bool = False) -> None:
    """Process-wide CUDA settings for a training run, fast kernels by default; a no-op off CUDA.

    On a CUDA device a run turns on

    * ``torch.backends.cudnn.benchmark``: cuDNN times its convolution algorithms for each input shape once
      and keeps the fastest (training batches have one shape, so the timing is paid once). Off when the recipe
      asks for ``training.deterministic``, since the chosen algorithm may then differ between runs.
    * TF32 for fp32 matrix multiplications and convolutions (``torch.backends.cuda.matmul.allow_tf32`` and
      ``torch.backends.cudnn.allow_tf32``) on Ampere and newer GPUs: fp32 recipes, and the fp32 parts of
      mixed-precision ones, run on the tensor cores with a 10-bit mantissa, as PyTorch's own docs recommend for
      training. The legacy flags are used on purpose: they update PyTorch's newer ``fp32_precision`` settings
      too, while setting the newer ones would make code that reads the legacy flags raise.

    Nothing changes on the CPU (and the CPU's own matmul precision is never touched).

    Args:
        device: the device the run trains on.
        deterministic: the recipe's ``training.deterministic``; keeps cuDNN's autotuner off.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
