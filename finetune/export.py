"""Export a checkpoint's model as ONNX, TorchScript or plain safetensors, with its labels beside it.

Every export writes two files: the model (``NAME.onnx``, ``NAME.pt`` or ``NAME.safetensors``) and its own
metadata file, the model's file name plus ``.json`` (``NAME.onnx.json``, ``NAME.pt.json``, ...: exports of
several formats to one stem never share, and so never overwrite, each other's metadata), holding the class names, the preprocessing and the input/output names and shapes. The model
takes a float32 ``N×3×H×W`` batch (RGB, resized, centre-cropped and normalised as the JSON says; any ``N``)
named ``input`` and returns ``N×C`` logits named ``logits``. A calibrated checkpoint's temperature
(:mod:`finetune.calibration`) is divided out inside the ONNX and TorchScript graphs, so their softmax is what
``finetune predict`` gives; a safetensors export holds the raw weights and the JSON's ``temperature`` to
divide by. The JSON of a calibrated export has ``temperature``.

* ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch dimension. The
  JSON is also stored in the model's metadata (``metadata_props`` key ``finetune``), so the ``.onnx`` file
  alone is enough for ``finetune eval`` and ``finetune benchmark``. ``quantize="int8"`` then quantises it
  with onnxruntime: dynamically (the default: the weights of the linear layers, MatMul/Gemm, in int8,
  their activations quantised on the fly; convolutions stay fp32, which onnxruntime runs faster than its
  dynamic ConvInteger) or statically (every supported op, weights per channel and activations in int8, QDQ
  format, activation ranges calibrated on ``calibration_images`` at the 99.999th percentile).
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

import numpy as np
import torch

from finetune._io import atomic_write, atomic_write_text, check_output, read_text_file
from finetune.calibration import TemperatureScaled, meta_temperature
from finetune.errors import FinetuneError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
"""Export format → file suffix."""

ONNX_METADATA_KEY = "finetune"
"""The ONNX ``metadata_props`` key holding the export JSON."""


def export_model(
    checkpoint: str | os.PathLike,
    *,
    format: str,
    out: str | os.PathLike | None = None,
    quantize: str | None = None,
    calibration_images: Sequence[str | os.PathLike] = (),
) -> Path:
    """Export the model of a checkpoint folder (or a run folder's best checkpoint).

    Args:
        checkpoint: the checkpoint or run folder.
        format: ``onnx``, ``torchscript`` or ``safetensors``.
        out: the model file to write; by default next to the checkpoint folder, named after it
            (``checkpoints/best`` → ``checkpoints/best.onnx``, ``best.int8.onnx`` quantised). The JSON goes to
            `metadata_path` of it (``best.onnx.json``).
        quantize: ``"int8"`` (ONNX only): onnxruntime's quantisation, static when ``calibration_images``
            are given, else dynamic.
        calibration_images: images (typically a sample of the training split) whose activation ranges
            calibrate static quantisation.

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
    if quantize not in (None, "int8"):
        raise FinetuneError(f"unknown quantisation {quantize!r} (expected int8)")
    if quantize and format != "onnx":
        raise FinetuneError(f"--quantize int8 needs --format onnx (onnxruntime quantises it), not {format}")
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
        if temperature != 1.0:  # calibrated: the graph divides the logits (safetensors: the JSON says to)
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
            _write_int8_onnx(model, example, info, path, calibration_images, meta["preprocessing"])
    else:
        writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}[format]
    atomic_write(out, lambda tmp: writer(model, example, info, tmp))
    atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
    return out


def metadata_path(model_file: str | os.PathLike) -> Path:
    """The metadata JSON of an exported model file: its name plus ``.json`` (``m.onnx`` → ``m.onnx.json``), so
    the exports of each format (and the int8 one) keep their own."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


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
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(info)
    program.save(str(path))


def _write_int8_onnx(model: torch.nn.Module | Path, example: torch.Tensor | None, info: dict[str, Any], path: Path,
                     calibration_images: Sequence[str | os.PathLike], preprocessing: dict[str, Any]) -> None:
    """The fp32 ONNX export (of ``model``, or the file ``model``), pre-processed (shape inference, graph
    optimisation) and quantised to int8."""
    import tempfile

    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_dynamic,
            quantize_static,
        )
    except ImportError as e:
        raise FinetuneError(f"int8 export needs onnxruntime ({e}): pip install 'finetune[export]'") from None
    with tempfile.TemporaryDirectory(prefix="finetune-int8-") as tmp:
        fp32, prepared, quantized = Path(tmp, "fp32.onnx"), Path(tmp, "prepared.onnx"), Path(tmp, "int8.onnx")
        if isinstance(model, Path):
            fp32 = model
        else:
            _write_onnx(model, example, info, fp32)
        try:
            quant_pre_process(str(fp32), str(prepared))
            if calibration_images:
                reader = _CalibrationReader(calibration_images, preprocessing)
                # percentile calibration: on the quickstart it lost 4.8 points of test accuracy, min-max 6.3
                quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                                calibrate_method=CalibrationMethod.Percentile)
            else:
                # the linear layers only (the head; a ViT's blocks): onnxruntime's dynamic ConvInteger ran the
                # quickstart's CNN 8-14x slower than fp32 convolutions and lost 7 points of accuracy
                quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
        except FinetuneError:
            raise
        except Exception as e:  # onnxruntime raises many types for graphs it cannot quantise
            raise FinetuneError(f"int8 quantisation of {info['backbone']} failed: {type(e).__name__}: "
                                f"{_first_line(e)}") from e
        proto = onnx.load(str(quantized))
        del proto.metadata_props[:]
        proto.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(info))
        path.write_bytes(proto.SerializeToString())  # by Python: a full disk raises OSError


class _CalibrationReader:
    """onnxruntime's ``CalibrationDataReader``: the calibration images, preprocessed as for evaluation, in
    batches of 16 (unreadable ones left out)."""

    def __init__(self, images: Sequence[str | os.PathLike], preprocessing: dict[str, Any]):
        from finetune.inference import eval_transform
        from finetune.data import ImageDecodeError, load_image

        transform = eval_transform(preprocessing)
        arrays = []
        for image in images:
            try:
                arrays.append(transform(image=load_image(image))["image"].numpy())
            except ImageDecodeError:
                continue
        if not arrays:
            raise FinetuneError(f"none of the {len(images)} calibration images could be read")
        self.batches = iter([{"input": np.stack(arrays[i:i + 16])} for i in range(0, len(arrays), 16)])

    def get_next(self):
        return next(self.batches, None)


def calibration_subset(items: Sequence[tuple[str | os.PathLike, int]], n: int, seed: int = 0) -> list[str]:
    """``n`` image paths of ``(path, class)`` items, drawn per class in turn (a seeded shuffle within
    each class), so every class shapes the activation ranges."""
    import random

    by_class: dict[int, list[str]] = {}
    for path, label in items:
        by_class.setdefault(int(label), []).append(str(path))
    rng = random.Random(seed)
    queues = [rng.sample(paths, len(paths)) for _, paths in sorted(by_class.items())]
    chosen: list[str] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return chosen


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "(not installed)"
    return onnxruntime.__version__


def read_onnx_info(path: str | os.PathLike) -> dict[str, Any]:
    """The export JSON of an ``.onnx`` file: from its metadata, else from ``NAME.json`` beside it.

    Raises:
        FinetuneError: the file is missing or not ONNX, or neither place holds the JSON.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"no such ONNX model: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FinetuneError(f"{path} is not an ONNX model: {type(e).__name__}: {_first_line(e)}") from None
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return json.loads(prop.value)
    sidecar = metadata_path(path)
    for candidate in (sidecar, path.with_suffix(".json")):  # NAME.json: what finetune 0.x wrote
        if candidate.is_file():
            try:
                return json.loads(read_text_file(candidate, "export metadata"))
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{candidate} is not valid JSON: {e}") from None
    raise FinetuneError(f"{path} holds no class names or preprocessing (not exported by finetune, and no "
                        f"{sidecar.name} beside it)")


class OnnxModel(torch.nn.Module):
    """An exported ``.onnx`` model run by onnxruntime behind the ``nn.Module`` interface (images in, logits
    out), so evaluation and prediction code takes it as it takes a checkpoint's model. Runs on the CPU
    (``device="cuda"``: onnxruntime's CUDA provider when installed).

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime's intra-op threads (None: its default, the physical cores).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, device: str = "cpu"):
        super().__init__()
        import onnxruntime

        self.path = Path(path)
        self.info = read_onnx_info(path)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            raise FinetuneError(f"onnxruntime cannot load {path}: {type(e).__name__}: {_first_line(e)}") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {"input": array})
        return torch.from_numpy(logits).to(images.device)


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
