"""Process-wide CUDA settings for a training run: fast kernels by default.

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
"""
from __future__ import annotations

import torch


def configure_cuda(device: torch.device, *, deterministic: bool = False) -> None:
    """Set the CUDA defaults above when ``device`` is a CUDA device; a no-op otherwise.

    Args:
        device: the device the run trains on.
        deterministic: the recipe's ``training.deterministic``; keeps cuDNN's autotuner off.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
