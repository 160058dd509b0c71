"""Export a checkpoint's model as ONNX, TorchScript or plain safetensors, with its labels beside it.

Every export writes two files: the model (``NAME.onnx``, ``NAME.pt`` or ``NAME.safetensors``) and its own
metadata file, the model's file name plus ``.json`` (``NAME.onnx.json``, ``NAME.pt.json``, ...: exports of
several formats to one stem never share, and so never overwrite, each other's metadata), holding the class names, the preprocessing and the input/output names and shapes. The model
takes a float32 ``N×3×H×W`` batch (RGB, resized, centre-cropped and normalised as the JSON says; any ``N``)
named ``input`` and returns ``N×C`` logits named ``logits``. A calibrated checkpoint's temperature
(:mod:`finetune.inference.temperature`) is divided out inside the ONNX and TorchScript graphs, so their softmax is what
``finetune predict`` gives; a safetensors export holds the raw weights and the JSON's ``temperature`` to
divide by. The JSON of a calibrated export has ``temperature``. A multi-label checkpoint's ONNX and TorchScript
exports output ``probabilities`` instead: each label's sigmoid probability (divided by its calibration temperature
first where calibrated), with ``task: multilabel`` and the per-label ``thresholds`` in the JSON.

* ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch dimension. The
  JSON is also stored in the model's metadata (``metadata_props`` key ``finetune``), so the ``.onnx`` file
  alone is enough for ``finetune eval`` and ``finetune benchmark``. ``quantize="int8"`` then quantises it
  with onnxruntime: dynamically (the default: the weights of the linear layers, MatMul/Gemm, in int8,
  their activations quantised on the fly; convolutions stay fp32, which onnxruntime runs faster than its
  dynamic ConvInteger) or statically (every supported op, weights per channel and activations in int8, QDQ
  format, activation ranges calibrated on ``calibration_images`` at the 99.999th percentile), the layer groups
  whose quantisation costs most kept in fp32 until the top-1 agreement with fp32 on ``validation_images`` is
  within ``max_drop`` (:mod:`finetune.deploy.sensitivity`).
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
from typing import Any, Sequence

import torch
from safetensors.torch import save

from finetune._io import atomic_write, atomic_write_text, check_output
from finetune.deploy.onnx import (
    _onnxruntime_version,
    _write_int8_onnx,
    _write_onnx,
    metadata_path,
    read_onnx_info,
)
from finetune.errors import FinetuneError
from finetune.inference.temperature import LabelProbabilities, TemperatureScaled, meta_temperature, meta_temperatures
from finetune.models.checkpoint import load_checkpoint, resolve_checkpoint

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
"""Export format → file suffix."""



def export_model(
    checkpoint: str | os.PathLike,
    *,
    format: str,
    out: str | os.PathLike | None = None,
    quantize: str | None = None,
    calibration_images: Sequence[str | os.PathLike] = (),
    validation_images: Sequence[str | os.PathLike] = (),
    max_drop: float = 0.01,
    qat_epochs: int = 0,
) -> Path:
    """Export the model of a checkpoint folder (or a run folder's best checkpoint).

    Args:
        checkpoint: the checkpoint or run folder.
        format: ``onnx``, ``torchscript``, ``safetensors``, or ``hub``: a model folder in timm's Hugging Face Hub
            layout (:func:`finetune.deploy.hub.export_hub`; ``out`` is then the folder).
        out: the model file to write; by default next to the checkpoint folder, named after it
            (``checkpoints/best`` → ``checkpoints/best.onnx``, ``best.int8.onnx`` quantised). The JSON goes to
            `metadata_path` of it (``best.onnx.json``).
        quantize: ``"int8"`` (ONNX only): onnxruntime's quantisation, static when ``calibration_images``
            are given, else dynamic.
        calibration_images: images (typically a sample of the training split) whose activation ranges
            calibrate static quantisation.
        validation_images: static int8: another sample of the training split on which the search keeps the
            int8 model's top-1 agreement with fp32 within ``max_drop``: onnx, layer groups returned to fp32
            (:mod:`finetune.deploy.sensitivity`); openvino, NNCF's accuracy control (:mod:`finetune.deploy.openvino`).
        max_drop: that budget (an absolute drop in agreement, 0.01: one decision in a hundred).
        qat_epochs: openvino int8: quantisation-aware fine-tuning for this many passes over the calibration images
            instead of post-training quantisation (for a model the latter cannot bring within ``max_drop``).

    Returns:
        The model file written.

    Raises:
        FinetuneError: an unknown format, an ``out`` ending in ``.json``, an export that fails or does
            not reproduce the model's logits, or an output that cannot be written (a previous export at
            ``out`` is then left as it was).
    """

    if format == "hub":
        if quantize or calibration_images:
            raise FinetuneError("--quantize is for --format onnx; a hub folder holds the fp32 weights")
        from finetune.deploy.hub import export_hub

        return export_hub(checkpoint, out)
    if qat_epochs and not (format == "openvino" and quantize):
        raise FinetuneError("quantisation-aware fine-tuning (--qat) is for --format openvino --quantize int8")
    if format == "openvino":
        return _export_openvino(checkpoint, out, quantize=quantize, calibration_images=calibration_images,
                                validation_images=validation_images, max_drop=max_drop, qat_epochs=qat_epochs)
    if format not in FORMATS:
        raise FinetuneError(f"unknown export format {format!r} (expected one of: "
                            f"{', '.join([*FORMATS, 'hub', 'openvino'])})")
    if quantize not in (None, "int8"):
        raise FinetuneError(f"unknown quantisation {quantize!r} (expected int8)")
    if quantize and format != "onnx":
        raise FinetuneError(f"--quantize int8 needs --format onnx (onnxruntime) or openvino (NNCF), not {format}")
    if calibration_images and not quantize:
        raise FinetuneError("calibration images are for static int8 quantisation: add --quantize int8")
    from_onnx = Path(checkpoint).suffix == ".onnx"
    if from_onnx and not quantize:
        raise FinetuneError(f"{checkpoint} is an ONNX model already: export a checkpoint, or add --quantize int8")
    folder = Path(checkpoint) if from_onnx else resolve_checkpoint(checkpoint)
    suffix = ".int8.onnx" if quantize else FORMATS[format]
    out = Path(out) if out is not None else folder.with_name(folder.name.removesuffix(".onnx") + suffix)
    if out.suffix == ".json":
        raise FinetuneError(f"{out}: the model file cannot end in .json (the labels file is written beside it)")
    sidecar = metadata_path(out)
    check_output(out)
    check_output(sidecar)

    if from_onnx:  # quantise an fp32 export: the model is the file itself
        info = read_onnx_info(folder)
        if info.get("quantization"):
            raise FinetuneError(f"{folder} is quantised already; give the fp32 export or the checkpoint")
        info["model_file"] = out.name
        model, meta, example = folder, {"preprocessing": info["preprocessing"]}, None
    else:
        model, meta = load_checkpoint(folder, map_location="cpu")
        info = export_info(meta, format=format, filename=out.name, source=folder)
        example = torch.randn(2, *meta["preprocessing"]["input_size"])
        temperature = meta_temperature(meta)
        if meta.get("task") == "multilabel":
            model = _multilabel_export(model, meta, info, format)
        elif temperature != 1.0:  # calibrated: the graph divides the logits (safetensors: the JSON says to)
            info["temperature"] = temperature
            if format == "safetensors":
                info["output"]["description"] += f"; divide the logits by temperature ({temperature:.6g}) first"
            else:
                model = TemperatureScaled(model, temperature)
                info["output"]["description"] += f" (already divided by the calibration temperature {temperature:.6g})"
    if quantize:
        info["quantization"] = {
            "dtype": "int8", "method": "static" if calibration_images else "dynamic",
            "calibration_images": len(calibration_images),
            "tool": f"onnxruntime {_onnxruntime_version()} quantize_{'static' if calibration_images else 'dynamic'}",
        }

        def writer(model, example, info, path):
            _write_int8_onnx(model, example, info, path, calibration_images, meta["preprocessing"],
                             validation_images, max_drop)
    else:
        writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}[format]
    atomic_write(out, lambda tmp: writer(model, example, info, tmp))
    atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
    return out


def _export_openvino(checkpoint, out, *, quantize, calibration_images, validation_images, max_drop,
                     qat_epochs=0) -> Path:
    """An OpenVINO export folder (:mod:`finetune.deploy.openvino`), written atomically."""
    from finetune._io import write_dir_atomic
    from finetune.deploy.openvino import FILES, write_openvino

    if quantize and not calibration_images:
        raise FinetuneError("OpenVINO int8 is static: it needs calibration images from the train split (--calibration N)")
    folder = resolve_checkpoint(checkpoint)
    out = Path(out) if out is not None else folder.with_name(folder.name + ("-openvino-int8" if quantize else "-openvino"))
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; an OpenVINO export is a folder")
    if out.is_dir() and any(p.name not in FILES for p in out.iterdir()):
        raise FinetuneError(f"--out {out} holds files that are not an OpenVINO export's; the export replaces the whole "
                            "folder: give a new folder")
    model, meta = load_checkpoint(folder, map_location="cpu")
    info = export_info(meta, format="openvino", filename="model.xml", source=folder)
    example = torch.randn(2, *meta["preprocessing"]["input_size"])
    temperature = meta_temperature(meta)
    if meta.get("task") == "multilabel":
        model = _multilabel_export(model, meta, info, "openvino")
    elif temperature != 1.0:
        info["temperature"] = temperature
        model = TemperatureScaled(model, temperature)
        info["output"]["description"] += f" (already divided by the calibration temperature {temperature:.6g})"
    write_dir_atomic(out, lambda tmp: write_openvino(_write_onnx, model, example, info, tmp,
                                                     calibration_images=calibration_images if quantize else (),
                                                     validation_images=validation_images, max_drop=max_drop,
                                                     qat_epochs=qat_epochs))
    return out


def _multilabel_export(model: torch.nn.Module, meta: dict[str, Any], info: dict[str, Any], format: str) -> torch.nn.Module:
    """A multi-label checkpoint's export: ONNX and TorchScript output each label's (calibrated) sigmoid probability,
    to compare with the JSON's ``thresholds``; safetensors keeps the raw weights, the JSON saying what to apply."""
    temperatures = meta_temperatures(meta)
    thresholds = meta.get("thresholds")
    if thresholds is None:
        thresholds = [0.5] * len(meta["classes"])
    info["task"] = "multilabel"
    info["thresholds"] = [float(t) for t in thresholds]
    if temperatures is not None:
        info["temperatures"] = [float(t) for t in temperatures]
    if format == "safetensors":
        info["output"]["description"] = (
            "one logit per label, in the order of classes: " + ("divide by temperatures, then " if temperatures
            is not None else "") + "sigmoid gives each label's probability; a label is predicted at or above its threshold")
        return model
    info["output"].update(name="probabilities", description=(
        "each label's sigmoid probability" + (" (calibrated: the logits divided by temperatures)" if temperatures
        is not None else "") + ", in the order of classes; a label is predicted at or above its threshold"))
    return LabelProbabilities(model, temperatures)


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
        "source_checkpoint": os.path.abspath(source),
        "versions": meta.get("versions", {}),
    }


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

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # written by Python, so a failed write (a full disk) raises OSError, not save_file's SafetensorError
    path.write_bytes(save(state, metadata={"finetune": json.dumps(info)}))
