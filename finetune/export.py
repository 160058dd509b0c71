"""Export a checkpoint's model as ONNX, TorchScript or plain safetensors, with its labels beside it.

Every export writes two files: the model (``NAME.onnx``, ``NAME.pt`` or ``NAME.safetensors``) and
``NAME.json`` holding the class names, the preprocessing and the input/output names and shapes. The model
takes a float32 ``N×3×H×W`` batch (RGB, resized, centre-cropped and normalised as the JSON says; any ``N``)
named ``input`` and returns ``N×C`` logits named ``logits``.

* ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch dimension.
* ``torchscript``: ``torch.jit.trace``; the JSON is also stored in the archive as ``extra/finetune.json``.
  The traced module is checked against the eager model on another batch size before it is written.
  PyTorch deprecates TorchScript in favour of ``torch.export``; prefer ``onnx`` for new deployments.
* ``safetensors``: the weights only, as in the checkpoint, with the JSON also in the file's metadata
  (key ``finetune``); rebuild with :func:`finetune.models.create_model` and the JSON's backbone and head.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from finetune._io import atomic_write, atomic_write_text, check_output
from finetune.errors import FinetuneError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
"""Export format → file suffix."""


def export_model(
    checkpoint: str | os.PathLike,
    *,
    format: str,
    out: str | os.PathLike | None = None,
) -> Path:
    """Export the model of a checkpoint folder (or a run folder's best checkpoint).

    Args:
        checkpoint: the checkpoint or run folder.
        format: ``onnx``, ``torchscript`` or ``safetensors``.
        out: the model file to write; by default next to the checkpoint folder, named after it
            (``checkpoints/best`` → ``checkpoints/best.onnx``). The JSON goes to the same path with the
            suffix ``.json``.

    Returns:
        The model file written.

    Raises:
        FinetuneError: an unknown format, an ``out`` ending in ``.json``, an export that fails or does
            not reproduce the model's logits, or an output that cannot be written (a previous export at
            ``out`` is then left as it was).
    """
    from finetune.checkpoint import load_checkpoint, resolve_checkpoint

    if format not in FORMATS:
        raise FinetuneError(f"unknown export format {format!r} (expected one of: {', '.join(FORMATS)})")
    folder = resolve_checkpoint(checkpoint)
    out = Path(out) if out is not None else folder.with_name(folder.name + FORMATS[format])
    if out.suffix == ".json":
        raise FinetuneError(f"{out}: the model file cannot end in .json (the labels file is written beside it)")
    sidecar = out.with_suffix(".json")
    check_output(out)
    check_output(sidecar)

    model, meta = load_checkpoint(folder, map_location="cpu")
    info = export_info(meta, format=format, filename=out.name, source=folder)
    example = torch.randn(2, *meta["preprocessing"]["input_size"])
    writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}[format]
    atomic_write(out, lambda tmp: writer(model, example, info, tmp))
    atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
    return out


def export_info(meta: dict[str, Any], *, format: str, filename: str, source: str | os.PathLike) -> dict[str, Any]:
    """The JSON written beside an export: what the model expects and what its outputs mean."""
    input_size = list(meta["preprocessing"]["input_size"])
    return {
        "format": format,
        "model_file": filename,
        "classes": list(meta["classes"]),
        "num_classes": len(meta["classes"]),
        "preprocessing": meta["preprocessing"],
        "input": {"name": "input", "shape": ["batch", *input_size], "dtype": "float32",
                  "description": "RGB images resized and cropped to input_size, scaled to 0-1, then (x - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", len(meta["classes"])], "dtype": "float32",
                   "description": "class scores; softmax gives probabilities, in the order of classes"},
        "backbone": meta["backbone"],
        "backbone_kwargs": meta.get("backbone_kwargs", {}),
        "head": meta["head"],
        "source_checkpoint": str(source),
        "versions": meta.get("versions", {}),
    }


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs both)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise FinetuneError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                            "pip install 'finetune[export]'") from None
    try:
        program = torch.onnx.export(
            model, (example,), input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
        )
    except Exception as e:  # torch.export raises many types for unsupported models
        raise FinetuneError(f"ONNX export of {info['backbone']} failed: {type(e).__name__}: {_first_line(e)}") from e
    program.save(str(path))


def _write_torchscript(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        # Tracer warnings about Python values frozen into the graph: the parity check below catches the
        # ones that matter (a batch size baked in). PyTorch's deprecation notices for torch.jit: the
        # module docstring and `finetune export --help` say so once.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="`torch.jit.*deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, example)
        check = torch.randn(3, *example.shape[1:])
        with torch.inference_mode():
            expected, got = model(check), traced(check)
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise FinetuneError(
                f"TorchScript trace of {info['backbone']} does not reproduce the model on a batch of 3 "
                "(the trace froze shape-dependent code); export to onnx instead"
            )
        buffer = io.BytesIO()  # written by Python, so a failed write (a full disk) raises OSError
        torch.jit.save(traced, buffer, _extra_files={"finetune.json": json.dumps(info)})
        path.write_bytes(buffer.getvalue())


def _write_safetensors(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # written by Python, so a failed write (a full disk) raises OSError, not save_file's SafetensorError
    path.write_bytes(save(state, metadata={"finetune": json.dumps(info)}))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]
