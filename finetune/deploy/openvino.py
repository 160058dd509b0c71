"""OpenVINO: the export (``finetune export --format openvino``, optional extra ``finetune[openvino]``), its int8
quantisation with NNCF's accuracy control, and `OpenVINOModel`, which runs an export behind the ``nn.Module``
interface for ``finetune eval`` and ``finetune benchmark``.

An export is a folder: ``model.xml`` + ``model.bin`` (OpenVINO IR, converted from the fp32 ONNX export, so it takes
the same ``input`` and gives the same ``logits`` or, multi-label, ``probabilities``; dynamic batch) and
``model.json`` (the export JSON of :func:`~finetune.deploy.export.export_info`).

int8 (``--quantize int8``): ``nncf.quantize_with_accuracy_control``: post-training static quantisation of every
supported op (weights per channel), calibrated on a sample of the **training** split, then NNCF's search: it ranks
the quantised ops by how much each costs on a validation sample (another, disjoint sample of the training split:
never val or test) and returns them to fp32, most costly first, until the metric is within ``max_drop`` of the fp32
model's. The metric needs no labels: the share of validation images whose top-1 class (multi-label: each label's
decision at its threshold) the model gives as the fp32 model does, so a drop of at most ``max_drop`` bounds the
accuracy the int8 model can lose on those images. The JSON's ``quantization`` states what ran and the agreement
reached.

Quantisation-aware fine-tuning (``--qat EPOCHS``), for a model post-training quantisation cannot bring within the
budget: NNCF's ``nncf.quantize`` on the PyTorch model (the same int8 scheme, calibrated on the same images) inserts
fake-quantise ops whose ranges are trainable, then the quantised model is fine-tuned for ``EPOCHS`` passes over the
calibration images to give the fp32 model's outputs (distillation: the KL divergence of the softmax, multi-label the
binary cross-entropy to each label's probability; no labels needed, and it optimises the very agreement the budget
bounds), at lr 1e-5 (NNCF's advice for QAT), BatchNorm statistics and dropout frozen (eval mode). It is converted to
IR with ``ov.convert_model``; the agreement before and after the fine-tuning and each epoch's loss are recorded, and a
result still outside the budget is refused. Hand-written only as a loop: NNCF has no fine-tuning loop of its own.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune._io import read_text_file
from finetune.data.decode import ImageDecodeError, load_image
from finetune.data.transforms import preprocessing_transform
from finetune.deploy.sensitivity import decisions
from finetune.errors import FinetuneError, first_line

XML, BIN, JSON = "model.xml", "model.bin", "model.json"
FILES = (XML, BIN, JSON)
DEFAULT_MAX_DROP = 0.01
QAT_LR = 1e-5
QAT_BATCH = 32
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin may pick bf16 on its own: an fp32 export runs fp32


def _openvino():
    try:
        import openvino  # lazy: optional (finetune[openvino])
    except ImportError as e:
        raise FinetuneError(f"OpenVINO export needs openvino ({e}): pip install 'finetune[openvino]'") from None
    return openvino


def is_openvino_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / XML).is_file() and (path / JSON).is_file()


def read_openvino_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The export JSON of an OpenVINO export folder.

    Raises:
        FinetuneError: not an export folder finetune wrote.
    """
    folder = Path(folder)
    if not is_openvino_folder(folder):
        raise FinetuneError(f"{folder} is not an OpenVINO export (a folder with {XML}, {BIN} and {JSON})")
    try:
        info = json.loads(read_text_file(folder / JSON, "OpenVINO export metadata"))
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{folder / JSON} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or "classes" not in info or "preprocessing" not in info:
        raise FinetuneError(f"{folder / JSON}: not finetune export metadata (no classes or preprocessing)")
    return info


def write_openvino(onnx_writer, model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], folder: Path, *,
                   calibration_images: Sequence[str | os.PathLike] = (),
                   validation_images: Sequence[str | os.PathLike] = (), max_drop: float = DEFAULT_MAX_DROP,
                   qat_epochs: int = 0) -> None:
    """Write the export into ``folder`` (a fresh temporary folder the caller swaps in): fp32, or int8 when
    ``calibration_images`` are given (``info["quantization"]`` is then filled in): post-training, or with
    ``qat_epochs`` quantisation-aware fine-tuning. ``onnx_writer`` writes the fp32 ONNX it is converted from
    (:func:`finetune.deploy.onnx._write_onnx`)."""
    ov = _openvino()
    with tempfile.TemporaryDirectory(prefix="finetune-openvino-") as tmp:
        onnx_path = Path(tmp, "fp32.onnx")
        onnx_writer(model, example, info, onnx_path)
        try:
            ov_model = ov.convert_model(str(onnx_path))
        except Exception as e:  # OpenVINO's frontends raise their own types
            raise FinetuneError(f"OpenVINO conversion of {info['backbone']} failed: {type(e).__name__}: "
                                f"{first_line(e)}") from e
    if calibration_images and qat_epochs:
        ov_model = _quantize_aware(ov, ov_model, model, example, info, calibration_images, validation_images, max_drop,
                                   qat_epochs)
    elif calibration_images:
        ov_model = _quantize(ov, ov_model, info, calibration_images, validation_images, max_drop)
    else:
        compiled = ov.Core().compile_model(ov_model, "CPU", FP32)
        check = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            expected = model(check).numpy()
        got = compiled(check.numpy())[0]
        if got.shape != expected.shape or np.abs(got - expected).max() > 1e-3:
            raise FinetuneError(f"the OpenVINO model of {info['backbone']} does not reproduce the checkpoint (max "
                                f"|difference| {np.abs(got - expected).max():.3g}); export to onnx instead")
    ov.save_model(ov_model, str(folder / XML), compress_to_fp16=False)
    (folder / JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _arrays(paths: Sequence[str | os.PathLike], preprocessing: dict[str, Any]) -> list[np.ndarray]:
    transform = preprocessing_transform(preprocessing)
    out = []
    for path in paths:
        try:
            out.append(transform(image=load_image(path))["image"].unsqueeze(0).numpy())
        except ImageDecodeError:
            continue
    return out


def _int8_inputs(ov, ov_model, info: dict[str, Any], calibration_images, validation_images):
    """What both int8 paths start from: nncf, the calibration and validation arrays, and the fp32 IR's decisions on
    the validation images (the reference the agreement is measured against)."""
    try:
        import nncf  # lazy: optional (finetune[openvino])
    except ImportError as e:
        raise FinetuneError(f"OpenVINO int8 needs nncf ({e}): pip install 'finetune[openvino]'") from None
    preprocessing = info["preprocessing"]
    calibration = _arrays(calibration_images, preprocessing)
    validation = _arrays(validation_images, preprocessing)
    if not calibration or not validation:
        raise FinetuneError("OpenVINO int8 needs readable calibration and validation images from the train split")
    reference = ov.Core().compile_model(ov_model, "CPU", FP32)
    return nncf, calibration, validation, [decisions(reference(x)[0], info) for x in validation]


def _agreement(compiled, items, info: dict[str, Any]) -> float:
    """The share of decisions a compiled model makes as the fp32 model did, over ``(array, fp32 decisions)`` items."""
    return float(np.mean([np.mean(decisions(compiled(x)[0], info) == ref) for x, ref in items]))


def _quantize(ov, ov_model, info: dict[str, Any], calibration_images, validation_images, max_drop: float):
    nncf, calibration, validation, expected = _int8_inputs(ov, ov_model, info, calibration_images, validation_images)
    items = list(zip(validation, expected))

    def agreement(compiled, data) -> float:  # NNCF's validation_fn signature
        return _agreement(compiled, data, info)

    try:
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, nncf.Dataset(calibration), nncf.Dataset(items, lambda item: item[0]), validation_fn=agreement,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration))
    except Exception as e:  # NNCF raises many types for graphs it cannot quantise
        raise FinetuneError(f"OpenVINO int8 quantisation of {info['backbone']} failed: {type(e).__name__}: "
                            f"{first_line(e)}; try quantisation-aware fine-tuning: --qat 2") from e
    reached = agreement(ov.Core().compile_model(quantized, "CPU"), items)
    if reached < 1 - max_drop - 1e-9:
        raise FinetuneError(f"OpenVINO int8 of {info['backbone']} agrees with fp32 on {reached:.4f} of the validation "
                            f"images, below the budget of {1 - max_drop:.4f} (--max-drop {max_drop}); try "
                            "quantisation-aware fine-tuning: --qat 2")
    info["quantization"] = {
        "dtype": "int8", "method": "nncf accuracy control", "max_drop": max_drop,
        "calibration_images": len(calibration), "validation_images": len(validation),
        "agreement_with_fp32": reached,
        "tool": f"nncf {nncf.__version__} quantize_with_accuracy_control, openvino {ov.__version__}",
    }
    return quantized


def _quantize_aware(ov, ov_model, model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any],
                    calibration_images, validation_images, max_drop: float, epochs: int):
    """int8 by quantisation-aware fine-tuning of ``model`` (the module the fp32 IR ``ov_model`` was converted from),
    as the module docstring says; returns the int8 IR."""
    nncf, calibration, validation, expected = _int8_inputs(ov, ov_model, info, calibration_images, validation_images)

    def agreement(ir) -> float:
        return _agreement(ov.Core().compile_model(ir, "CPU"), zip(validation, expected), info)

    images = torch.from_numpy(np.concatenate(calibration))
    batches = [images[i:i + QAT_BATCH] for i in range(0, len(images), QAT_BATCH)]
    teacher = model.eval()
    with torch.inference_mode():
        targets = torch.cat([teacher(b) for b in batches]).clone()
    multilabel = info.get("task") == "multilabel"
    try:
        student = nncf.quantize(copy.deepcopy(teacher).eval(), nncf.Dataset(batches), subset_size=len(batches))
        before = agreement(_to_ir(ov, student, example, info))
        student.eval()  # BatchNorm statistics and dropout stay as trained: only weights and quantiser ranges move
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=QAT_LR)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(epochs):
            total = 0.0
            order = torch.randperm(len(images), generator=generator)
            for i in range(0, len(images), QAT_BATCH):
                idx = order[i:i + QAT_BATCH]
                loss = _distillation(student(images[idx]), targets[idx], multilabel)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            losses.append(total / len(images))
        quantized = _to_ir(ov, student, example, info)
    except FinetuneError:
        raise
    except Exception as e:  # NNCF and the PyTorch frontend raise many types for models they cannot handle
        raise FinetuneError(f"quantisation-aware fine-tuning of {info['backbone']} failed: {type(e).__name__}: "
                            f"{first_line(e)}") from e
    reached = agreement(quantized)
    if reached < 1 - max_drop - 1e-9:
        raise FinetuneError(f"OpenVINO int8 of {info['backbone']} after {epochs} epoch(s) of quantisation-aware "
                            f"fine-tuning agrees with fp32 on {reached:.4f} of the validation images, below the budget "
                            f"of {1 - max_drop:.4f} (--max-drop {max_drop}); try more epochs or more --calibration "
                            "images")
    info["quantization"] = {
        "dtype": "int8", "method": "nncf quantization-aware fine-tuning", "max_drop": max_drop,
        "calibration_images": len(calibration), "validation_images": len(validation),
        "epochs": epochs, "lr": QAT_LR, "batch_size": QAT_BATCH,
        "loss": "kl divergence to fp32" if not multilabel else "binary cross-entropy to fp32 probabilities",
        "distillation_loss_per_epoch": losses,
        "agreement_before_fine_tuning": before, "agreement_with_fp32": reached,
        "tool": f"nncf {nncf.__version__} quantize + fine-tuning, openvino {ov.__version__} convert_model",
    }
    return quantized


def _distillation(output: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """How far the quantised model's output is from the fp32 model's: the KL divergence of their softmax
    (logits), or, multi-label (the export's outputs are probabilities), the binary cross-entropy to them."""
    if multilabel:
        return torch.nn.functional.binary_cross_entropy(output.clamp(1e-6, 1 - 1e-6), target)
    return torch.nn.functional.kl_div(output.log_softmax(1), target.log_softmax(1), log_target=True,
                                      reduction="batchmean")


def _to_ir(ov, module: torch.nn.Module, example: torch.Tensor, info: dict[str, Any]):
    """An NNCF-quantised PyTorch module as OpenVINO IR (fake-quantise ops become int8), with the ONNX export's input
    and output names and a dynamic batch."""
    module.eval()
    # the tracer's own check warns of fake-quantise rounding and .item() calls NNCF makes: expected, not the user's
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ir = ov.convert_model(module, example_input=example[:1],
                              input=[ov.PartialShape([-1, *example.shape[1:]])])
    ir.inputs[0].get_tensor().set_names({"input"})
    ir.outputs[0].get_tensor().set_names({info["output"]["name"]})
    return ir


class OpenVINOModel(torch.nn.Module):
    """An OpenVINO export folder run by OpenVINO's CPU plugin behind the ``nn.Module`` interface (images in, the
    export's output out: logits, or a multi-label export's probabilities)."""

    def __init__(self, folder: str | os.PathLike, *, threads: int | None = None, device: str = "cpu"):
        super().__init__()
        if device != "cpu":
            raise FinetuneError("OpenVINO exports run on the CPU here (OpenVINO's GPU plugin is for Intel GPUs)")
        ov = _openvino()
        self.folder = Path(folder)
        self.info = read_openvino_info(folder)
        config = {**({} if self.info.get("quantization") else FP32),
                  **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
        try:
            self.compiled = ov.Core().compile_model(str(self.folder / XML), "CPU", config)
        except Exception as e:  # a truncated or foreign IR
            raise FinetuneError(f"{self.folder / XML}: OpenVINO cannot load it: {type(e).__name__}: {first_line(e)}") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.asarray(self.compiled(array)[0])).to(images.device)
