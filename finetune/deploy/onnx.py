"""ONNX: the fp32 export (``torch.onnx.export``, dynamic batch), its int8 quantisation with onnxruntime
(dynamic, or static on a quantisation sample of training images), reading an export's metadata back, and
`OnnxModel`, which runs an export behind the ``nn.Module`` interface for evaluation and benchmarks."""
from __future__ import annotations

import json
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune._io import read_text_file
from finetune.data.decode import ImageDecodeError, load_image
from finetune.data.multilabel import labels_like_run
from finetune.data.prepare import split_like_run
from finetune.data.transforms import preprocessing_transform
from finetune.deploy import sensitivity
from finetune.errors import FinetuneError, first_line
from finetune.models.checkpoint import read_meta, resolve_checkpoint, run_folder_of

ONNX_METADATA_KEY = "finetune"
"""The ONNX ``metadata_props`` key holding the export JSON."""


def metadata_path(model_file: str | os.PathLike) -> Path:
    """The metadata JSON of an exported model file: its name plus ``.json`` (``m.onnx`` → ``m.onnx.json``), so
    the exports of each format (and the int8 one) keep their own."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs both)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise FinetuneError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                            "pip install 'finetune[export]'") from None
    try:
        program = torch.onnx.export(
            model, (example,), input_names=["input"], output_names=[info["output"]["name"]],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
        )
    except Exception as e:  # torch.export raises many types for unsupported models
        raise FinetuneError(f"ONNX export of {info['backbone']} failed: {type(e).__name__}: {first_line(e)}") from e
    program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(info)
    program.save(str(path))


def _write_int8_onnx(model: torch.nn.Module | Path, example: torch.Tensor | None, info: dict[str, Any], path: Path,
                     calibration_images: Sequence[str | os.PathLike], preprocessing: dict[str, Any],
                     validation_images: Sequence[str | os.PathLike] = (), max_drop: float = 0.01) -> None:
    """The fp32 ONNX export (of ``model``, or the file ``model``), pre-processed (shape inference, graph
    optimisation) and quantised to int8: dynamically without ``calibration_images``; statically with them, and
    with ``validation_images`` (another sample of the train split) the layer groups whose quantisation costs
    most go back to fp32 until the share of fp32 decisions kept with margin on them is within ``max_drop`` of 1
    (:mod:`finetune.deploy.sensitivity`; ``info["quantization"]`` records the search)."""
    try:
        import onnx  # lazy: optional (finetune[export])
        from onnxruntime.quantization import (  # lazy: optional (finetune[export])
            QuantType,
            quant_pre_process,
            quantize_dynamic,
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
                _quantize_static(prepared, quantized, Path(tmp), info, calibration_images, preprocessing,
                                 validation_images, max_drop)
            else:
                # the linear layers only (the head; a ViT's blocks): onnxruntime's dynamic ConvInteger ran the
                # quickstart's CNN 8-14x slower than fp32 convolutions and lost 7 points of accuracy
                quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
        except FinetuneError:
            raise
        except Exception as e:  # onnxruntime raises many types for graphs it cannot quantise
            raise FinetuneError(f"int8 quantisation of {info['backbone']} failed: {type(e).__name__}: "
                                f"{first_line(e)}") from e
        proto = onnx.load(str(quantized))
        del proto.metadata_props[:]
        proto.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(info))
        path.write_bytes(proto.SerializeToString())  # by Python: a full disk raises OSError


def _quantize_static(prepared: Path, quantized: Path, tmp: Path, info: dict[str, Any], calibration_images,
                     preprocessing: dict[str, Any], validation_images, max_drop: float) -> None:
    """Static int8 of ``prepared`` into ``quantized``, with the sensitivity search where ``validation_images``
    are given. The activation ranges are calibrated once (onnxruntime's calibration cache) and reused by every
    candidate of the search."""
    import onnx  # lazy: optional (finetune[export])
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(prepared))
    for i, node in enumerate(proto.graph.node):  # nodes_to_exclude matches names: every node needs one
        if not node.name:
            node.name = f"finetune_{node.op_type}_{i}"
    onnx.save(proto, str(prepared))
    groups = sensitivity.layer_groups(proto.graph)
    reader = _QuantizationReader(calibration_images, preprocessing)
    cache = tmp / "activation_ranges.json"

    def quantise(excluded: Sequence[str], out: Path) -> None:
        # percentile calibration: with everything in int8 it lost 1.5 points less than min-max on the quickstart
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=list(excluded),
                        calibration_cache_path=str(cache))

    validation = _QuantizationReader(validation_images, preprocessing).arrays if validation_images else []
    if not validation:  # no search: every supported op in int8
        quantise([], quantized)
        info["quantization"].update(search="none (no validation images)", fp32_groups=[])
        return

    def outputs(model_path: Path) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        name = session.get_outputs()[0].name
        return np.concatenate([session.run([name], {"input": np.stack(validation[i:i + 32])})[0]
                               for i in range(0, len(validation), 32)])

    reference = outputs(prepared)
    candidate = tmp / "candidate.onnx"

    def kept_with_margin(kept: frozenset[str]) -> float:
        quantise(sensitivity.exclusions(groups, sorted(kept)), candidate)
        return sensitivity.kept_with_margin(outputs(candidate), reference, info)

    kept, reached, trace = sensitivity.search_fp32_groups(groups, kept_with_margin, max_drop)
    quantise(sensitivity.exclusions(groups, kept), quantized)
    agreement = sensitivity.agreement(sensitivity.decisions(outputs(quantized), info),
                                      sensitivity.decisions(reference, info))
    info["quantization"].update(
        search="layer-group sensitivity (finetune.deploy.sensitivity)", max_drop=max_drop,
        measure="decisions kept with margin (finetune.deploy.sensitivity.kept_with_margin)",
        validation_images=len(validation), fp32_groups=kept, kept_with_margin=reached, agreement_with_fp32=agreement,
        groups={g: len(members) for g, members in groups.items()}, trace=trace)


class _QuantizationReader:
    """onnxruntime's ``CalibrationDataReader``: the quantisation sample's images, preprocessed as for evaluation, in
    batches of 16 (unreadable ones left out)."""

    def __init__(self, images: Sequence[str | os.PathLike], preprocessing: dict[str, Any]):
        transform = preprocessing_transform(preprocessing)
        arrays = []
        for image in images:
            try:
                arrays.append(transform(image=load_image(image))["image"].numpy())
            except ImageDecodeError:
                continue
        if not arrays:
            raise FinetuneError(f"none of the {len(images)} calibration images could be read")
        self.arrays = arrays
        self.batches = iter([{"input": np.stack(arrays[i:i + 16])} for i in range(0, len(arrays), 16)])

    def get_next(self):
        return next(self.batches, None)


def quantization_sample(items: Sequence[tuple[str | os.PathLike, int]], n: int, seed: int = 0) -> list[str]:
    """``n`` image paths of ``(path, class)`` items, drawn per class in turn (a seeded shuffle within
    each class), so every class shapes the activation ranges."""
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
        import onnxruntime  # lazy: optional (finetune[export])
    except ImportError:
        return "(not installed)"
    return onnxruntime.__version__


def read_onnx_info(path: str | os.PathLike) -> dict[str, Any]:
    """The export JSON of an ``.onnx`` file: from its metadata, else from ``NAME.json`` beside it.

    Raises:
        FinetuneError: the file is missing or not ONNX, or neither place holds the JSON.
    """
    import onnx  # lazy: optional (finetune[export])

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"no such ONNX model: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FinetuneError(f"{path} is not an ONNX model: {type(e).__name__}: {first_line(e)}") from None
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
        import onnxruntime  # lazy: optional (finetune[export])

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
            raise FinetuneError(f"onnxruntime cannot load {path}: {type(e).__name__}: {first_line(e)}") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        # a multi-label export's output is its sigmoid probabilities ("probabilities"), else logits
        (outputs,) = self.session.run([self.info.get("output", {}).get("name", "logits")], {"input": array})
        return torch.from_numpy(outputs).to(images.device)


def quantization_images(checkpoint: str | os.PathLike, n: int, data: str | os.PathLike | None) -> list[str]:
    """The quantisation sample of static int8: ``n`` training images of the checkpoint's run (or of ``data``),
    spread over the classes (`quantization_sample`). ``checkpoint`` may be an fp32 ``.onnx`` export, whose
    source checkpoint knows the data.

    Raises:
        FinetuneError: the training images are not here (give ``data``), or ``data`` has no train split.
    """
    if Path(checkpoint).suffix == ".onnx":
        checkpoint = read_onnx_info(checkpoint)["source_checkpoint"]
        if not Path(checkpoint).exists():
            if not data:
                raise FinetuneError(f"static int8 quantisation needs the training images: the export's checkpoint "
                                    f"{checkpoint} is not here; give --data ROOT|MANIFEST (or, ONNX, --calibration 0: "
                                    f"dynamic int8)")
            return quantization_sample(split_like_run(data, {}).items("train"), n)
    folder = resolve_checkpoint(checkpoint)
    recipe_data = (read_meta(folder).get("recipe") or {}).get("data") or {}
    data = data or recipe_data.get("root") or recipe_data.get("manifest")
    if not data or not Path(data).exists():
        raise FinetuneError(f"static int8 quantisation needs the training images: the checkpoint's data "
                            f"({data or 'none recorded'}) is not here; give --data ROOT|MANIFEST (or, ONNX, --calibration 0: "
                            f"dynamic int8)")
    run_dir = run_folder_of(folder)
    if read_meta(folder).get("task") == "multilabel":  # per first label in turn
        table = labels_like_run(data, recipe_data, run_dir and run_dir / "manifest.csv")
        if "train" not in table.splits():
            raise FinetuneError(f"{data} has no train split to calibrate on")
        return quantization_sample([(p, int(np.argmax(t))) for p, t in table.items("train")], n)
    manifest = split_like_run(data, recipe_data, run_dir and run_dir / "manifest.csv")
    if "train" not in manifest.splits():
        raise FinetuneError(f"{data} has no train split to calibrate on")
    return quantization_sample(manifest.items("train"), n)


def quantization_split(checkpoint: str | os.PathLike, n: int,
                       data: str | os.PathLike | None) -> tuple[list[str], list[str]]:
    """Static int8's two samples of the train split (`quantization_images`): ``n`` images to calibrate on and
    ``n`` others for the accuracy search; a train split with fewer than ``2 n`` is halved. The sample's order goes
    round the classes, so both halves cover them.

    Raises:
        FinetuneError: as `quantization_images`.
    """
    both = quantization_images(checkpoint, 2 * n, data)
    n = n if len(both) >= 2 * n else max(1, len(both) // 2)
    return both[:n], both[n:]


def calibration_subset(items: Sequence[tuple[str | os.PathLike, int]], n: int, seed: int = 0) -> list[str]:
    """`quantization_sample` under its old name, for one release (a DeprecationWarning)."""
    warnings.warn("finetune.export.calibration_subset is now finetune.deploy.onnx.quantization_sample; the old name "
                  "goes in finetune 0.2", DeprecationWarning, stacklevel=2)
    return quantization_sample(items, n, seed)
