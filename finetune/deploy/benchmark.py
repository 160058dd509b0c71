"""Inference latency and throughput of one model on this machine: PyTorch eager, PyTorch compiled, ONNX
Runtime fp32 and int8, side by side.

From a checkpoint the ONNX models are exported into a temporary folder (int8: with ``calibration`` images, the
static int8 ``finetune export --quantize int8`` makes by default, calibrated and searched on the checkpoint's train
split, row ``onnxruntime int8 static``; without them, or where the training images are not here or the search
cannot keep the budget, dynamic quantisation, row ``onnxruntime int8``, and ``int8`` says why); an ``.onnx`` file
given is used for its row instead
(fp32 or int8, as its metadata says), and the checkpoint it was exported from (when still there) gives the
PyTorch rows and any ONNX model not given. Every backend gets the same random
batch; the backends run in turns (A B C D, D C B A, ...) so a change in the machine's load hits them alike,
and each call is timed on its own: latency is the median and 90th percentile of a call (one batch), and
throughput is images per second at the median. On a GPU the PyTorch rows (and ONNX Runtime's, with its CUDA
provider installed) run again on it, with the device synchronised before each clock reading.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from finetune.deploy.export import export_model
from finetune.deploy.onnx import OnnxModel, quantization_split, read_onnx_info
from finetune.deploy.openvino import OpenVINOModel, is_openvino_folder, read_openvino_info
from finetune.errors import FinetuneError, first_line
from finetune.models.checkpoint import is_hub_folder, load_checkpoint, read_meta, resolve_checkpoint

BACKENDS = ("pytorch eager", "pytorch compiled", "onnxruntime fp32", "onnxruntime int8")
"""The rows of every benchmark; a statically quantised .onnx given adds ``onnxruntime int8 static``."""


def benchmark(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batches: Sequence[int] = (1, 32),
    threads: Optional[int] = None,
    iterations: int = 20,
    warmup: int = 2,
    devices: Optional[Sequence[str]] = None,
    aa: bool = False,
    calibration: int = 0,
    data: str | os.PathLike | None = None,
    max_drop: float = 0.01,
) -> dict[str, Any]:
    """Time every backend on one model: a checkpoint (or run folder) and/or its ``.onnx`` exports.

    Args:
        sources: a checkpoint or run folder, ``.onnx`` exports of one model (fp32 and/or int8), OpenVINO export
            folders of it (rows ``openvino fp32``/``openvino int8``, ``openvino int8 qat`` for a quantisation-aware
            one, on the CPU), or several of these.
        batches: batch sizes to time.
        threads: CPU threads for PyTorch and ONNX Runtime (None: each library's default).
        iterations: timed calls per backend and batch size.
        warmup: untimed calls first (torch.compile compiles in its first).
        devices: ``cpu`` and/or ``cuda`` (default: the CPU, and the GPU when there is one).
        aa: add ``onnxruntime fp32 (A/A)``, a second session of the same fp32 model timed in the same turns: its
            latency ratio to the first (``aa_ratio``) is how far two identical models differ here, the spread to
            read the speed-ups against.
        calibration: from a checkpoint with no int8 ``.onnx`` given: static int8 calibrated on this many images
            of the train split (of ``data``, default the checkpoint's run's), the search on as many others within
            ``max_drop``, as ``finetune export --quantize int8 --calibration N`` does; 0: dynamic int8.
        data: where those images are (default: the data the checkpoint's run trained on).
        max_drop: the static search's budget (top-1 agreement with fp32).

    Returns:
        ``{"sources", "checkpoint", "input_size", "threads", "iterations", "rows", "int8_speedup", "int8"}``
        (``int8``: which int8 model was timed, and why, where it was exported here); each row
        holds ``backend``, ``device``, ``batch``, ``status`` (``ok`` or why it could not run),
        ``latency_ms`` (``median``, ``p90``) and ``images_per_s``; ``int8_speedup`` maps
        ``"DEVICE/BATCH"`` to ONNX Runtime fp32's median latency over int8's (dynamic, else static), and
        ``"DEVICE/BATCH/openvino int8"`` to it over a given OpenVINO int8 export's; with ``aa``, ``aa_ratio``
        maps ``"DEVICE/BATCH"`` to the first fp32 session's median latency over the second's. A hub-format
        folder (``finetune export --format hub``) given adds ``hub folder (finetune.load)`` and, for a linear
        head, ``hub folder (plain timm)``: ``timm.create_model("local-dir:DIR", pretrained=True)``.
    """

    if not batches or min(batches) < 1 or iterations < 1:
        raise FinetuneError("benchmark needs batch sizes of 1 or more and at least one iteration")
    devices = list(devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))
    if "cuda" in devices and not torch.cuda.is_available():
        raise FinetuneError("--device cuda asked for, but CUDA is not available")
    sources = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(s) for s in sources]
    given_onnx: dict[str, Path] = {}
    checkpoints, info = [], None
    given_openvino: dict[str, Path] = {}
    hub_folder = None
    for source in sources:
        if source.is_dir() and is_hub_folder(source):
            hub_folder = source
        elif is_openvino_folder(source):
            info = read_openvino_info(source)
            method = (info.get("quantization") or {}).get("method", "")
            given_openvino["openvino fp32" if not method else
                           "openvino int8 qat" if "quantization-aware" in method else "openvino int8"] = source
            if info.get("source_checkpoint") and Path(info["source_checkpoint"]).exists():
                checkpoints.append(info["source_checkpoint"])
        elif source.suffix == ".onnx":
            info = read_onnx_info(source)
            method = (info.get("quantization") or {}).get("method")
            given_onnx[{None: "onnxruntime fp32", "dynamic": "onnxruntime int8"}.get(method, "onnxruntime int8 static")] = source
            if info.get("source_checkpoint") and Path(info["source_checkpoint"]).exists():
                checkpoints.append(info["source_checkpoint"])
        else:
            checkpoints.insert(0, resolve_checkpoint(source))
    checkpoint = resolve_checkpoint(checkpoints[0]) if checkpoints else None
    why_no_checkpoint = "" if checkpoint else (
        f"no checkpoint: the one the .onnx came from ({info and info.get('source_checkpoint')}) is not here")

    int8_note = next((f"{name.removeprefix('onnxruntime ')}: {path} (given)" for name, path in given_onnx.items()
                      if "int8" in name), None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-benchmark-") as tmp:
            onnx_files = dict(given_onnx)
            model, meta = load_checkpoint(checkpoint) if checkpoint else (None, info)
            if checkpoint:
                if "onnxruntime fp32" not in onnx_files:
                    onnx_files["onnxruntime fp32"] = export_model(checkpoint, format="onnx", out=Path(tmp, "fp32.onnx"))
                if "onnxruntime int8" not in onnx_files and "onnxruntime int8 static" not in onnx_files:
                    name, path, int8_note = _int8_export(checkpoint, Path(tmp), calibration, data, max_drop)
                    onnx_files[name] = path
            input_size = list(meta["preprocessing"]["input_size"])
            rows = []
            for device in devices:
                runners = _runners(model, onnx_files, device, threads, why_no_checkpoint, OnnxModel)
                for name, folder in given_openvino.items():  # rows only for the exports given
                    runners[name] = (OpenVINOModel(folder, threads=threads) if device == "cpu" else
                                     "unavailable: OpenVINO exports run on the CPU here")
                if aa and not isinstance(runners.get("onnxruntime fp32"), (str, type(None))):
                    runners["onnxruntime fp32 (A/A)"] = OnnxModel(onnx_files["onnxruntime fp32"], threads=threads,
                                                                  device=device)
                if hub_folder is not None:
                    runners.update(_hub_runners(hub_folder, device))
                for batch in batches:
                    rows += _time_backends(runners, device, batch, input_size, iterations, warmup)
    finally:
        torch.set_num_threads(previous_threads)

    speedup, aa_ratio = {}, {}
    for device in devices:
        for batch in batches:
            fp32, int8 = (_row(rows, b, device, batch) for b in ("onnxruntime fp32", "onnxruntime int8"))
            int8 = int8 or _row(rows, "onnxruntime int8 static", device, batch)
            if fp32 and int8:
                speedup[f"{device}/{batch}"] = fp32["latency_ms"]["median"] / int8["latency_ms"]["median"]
            openvino = _row(rows, "openvino int8", device, batch)
            if fp32 and openvino:
                speedup[f"{device}/{batch}/openvino int8"] = fp32["latency_ms"]["median"] / openvino["latency_ms"]["median"]
            second = _row(rows, "onnxruntime fp32 (A/A)", device, batch)
            if fp32 and second:
                aa_ratio[f"{device}/{batch}"] = fp32["latency_ms"]["median"] / second["latency_ms"]["median"]
    return {
        "sources": [str(s) for s in sources], "checkpoint": str(checkpoint) if checkpoint else None, "input_size": input_size,
        "threads": threads or torch.get_num_threads(), "iterations": iterations, "rows": rows,
        "int8_speedup": speedup, "int8": int8_note, **({"aa_ratio": aa_ratio} if aa else {}),
    }


def _int8_export(checkpoint: Path, tmp: Path, calibration: int, data, max_drop: float) -> tuple[str, Path, str]:
    """(row, file, what it is) of the int8 model a benchmark from a checkpoint times: static as ``finetune export``
    makes it when ``calibration`` images can be had and the search keeps the budget, else dynamic, saying why."""
    if calibration:
        try:
            images, validation = quantization_split(checkpoint, calibration, data)
            path = export_model(checkpoint, format="onnx", quantize="int8", out=tmp / "int8-static.onnx",
                                calibration_images=images, validation_images=validation, max_drop=max_drop)
        except FinetuneError as e:
            why = f"static int8 could not be made ({first_line(e)})"
        else:
            q = read_onnx_info(path)["quantization"]
            searched = (f", top-1 agreement with fp32 {q['agreement_with_fp32']:.4f} on {q['validation_images']} "
                        f"others" if "agreement_with_fp32" in q else "")
            return "onnxruntime int8 static", path, (
                f"int8 static (as finetune export --quantize int8 makes it): {len(images)} calibration images of the "
                f"train split{searched}, layer groups kept in fp32: {', '.join(q['fp32_groups']) or 'none'}")
    else:
        why = "no calibration images asked for"
    return "onnxruntime int8", export_model(checkpoint, format="onnx", quantize="int8", out=tmp / "int8.onnx"), (
        f"int8 dynamic (the linear layers only): {why}")


def format_table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table, the int8 speed-ups under it."""
    header = ("backend", "device", "batch", "median ms", "p90 ms", "images/s", "")
    lines = [header]
    for row in result["rows"]:
        if row["status"] == "ok":
            lat = row["latency_ms"]
            lines.append((row["backend"], row["device"], str(row["batch"]), f"{lat['median']:.2f}",
                          f"{lat['p90']:.2f}", f"{row['images_per_s']:.1f}", ""))
        else:
            lines.append((row["backend"], row["device"], str(row["batch"]), "-", "-", "-", row["status"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i < 2 or i == 6 else cell.rjust(w) for i, (cell, w) in
                      enumerate(zip(line, widths))).rstrip() for line in lines]
    for key, value in result["int8_speedup"].items():
        device, batch, *which = key.split("/")
        text.append(f"{which[0] if which else 'int8'} speed-up over ONNX Runtime fp32 ({device}, batch {batch}): "
                    f"{value:.2f}x")
    if result.get("int8"):
        text.append(result["int8"])
    return "\n".join(text)


# ------------------------------------------------------------------------------------------- helpers

def _runners(model, onnx_files: dict[str, Path], device: str, threads: Optional[int], why_no_checkpoint: str,
             onnx_model) -> dict[str, Callable[[torch.Tensor], Any] | str]:
    """Backend → a callable running one batch (returning once the result is ready), or why it cannot run."""
    runners: dict[str, Callable[[torch.Tensor], Any] | str] = {}
    if model is None:
        runners["pytorch eager"] = runners["pytorch compiled"] = why_no_checkpoint
    else:
        eager = model.to(device).eval()
        runners["pytorch eager"] = _eager_runner(eager, device)
        try:
            compiled = torch.compile(eager)
        except Exception as e:  # torch.compile refuses some platforms up front
            runners["pytorch compiled"] = f"unavailable: {type(e).__name__}: {first_line(e)}"
        else:
            runners["pytorch compiled"] = _eager_runner(compiled, device)
    for name in ("onnxruntime fp32", "onnxruntime int8", "onnxruntime int8 static"):
        path = onnx_files.get(name)
        if path is None and name.endswith("static"):
            continue  # a row only when such a model is given
        if path is None:
            runners[name] = why_no_checkpoint
            continue
        if device == "cuda":
            import onnxruntime  # lazy: optional (finetune[export])

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                runners[name] = "unavailable: onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
                continue
        session = onnx_model(path, threads=threads, device=device)
        runners[name] = session
    return runners


def _eager_runner(module, device: str) -> Callable[[torch.Tensor], Any]:
    """One batch through a PyTorch module, returning once the result is ready (the device synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(x):
        with torch.inference_mode():
            out = module(x)
        sync()
        return out
    return run


def _hub_runners(folder: Path, device: str) -> dict[str, Any]:
    """The hub folder as finetune loads it, and (a linear head) as plain timm does."""
    import timm

    from finetune.models.hub_format import timm_classifier

    def eager(module):
        return _eager_runner(module.to(device).eval(), device)

    runners: dict[str, Any] = {"hub folder (finetune.load)": eager(load_checkpoint(folder)[0])}
    if timm_classifier(read_meta(folder)):
        runners["hub folder (plain timm)"] = eager(timm.create_model(f"local-dir:{folder}", pretrained=True))
    else:
        runners["hub folder (plain timm)"] = ("unavailable: not a linear head: plain timm loads the backbone "
                                              "only (the model card says so)")
    return runners


def _time_backends(runners: dict[str, Any], device: str, batch: int, input_size: list[int], iterations: int,
                   warmup: int) -> list[dict[str, Any]]:
    """Time every runnable backend on one batch size, in alternating turns."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32))
    x = x.to(device)
    times: dict[str, list[float]] = {}
    status: dict[str, str] = {name: r if isinstance(r, str) else "ok" for name, r in runners.items()}
    live = [name for name in runners if status[name] == "ok"]
    for name in list(live):
        try:
            for _ in range(max(warmup, 1)):
                runners[name](x)
        except Exception as e:  # e.g. torch.compile without a working C++ compiler
            status[name] = f"unavailable: {type(e).__name__}: {first_line(e)}"
            live.remove(name)
    for name in live:
        times[name] = []
    for i in range(iterations):
        for name in live if i % 2 == 0 else reversed(live):
            start = time.perf_counter()
            runners[name](x)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in runners:
        row: dict[str, Any] = {"backend": name, "device": device, "batch": batch, "status": status[name]}
        if name in times:
            ms = sorted(t * 1000 for t in times[name])
            median = statistics.median(ms)
            row.update(latency_ms={"median": median, "p90": float(np.percentile(ms, 90)), "min": ms[0]},
                       images_per_s=batch * 1000 / median)
        rows.append(row)
    return rows


def _row(rows: list[dict[str, Any]], backend: str, device: str, batch: int) -> Optional[dict[str, Any]]:
    for row in rows:
        if (row["backend"], row["device"], row["batch"]) == (backend, device, batch) and row["status"] == "ok":
            return row
    return None
