"""Deployment: int8 (ONNX Runtime and OpenVINO), OpenVINO fp32 and the hub folder, against fp32, on two checkpoints.

    python benchmarks/bench_export.py                  # trains both checkpoints on the digits first (a few minutes)
    python benchmarks/bench_export.py --run /tmp/qs    # a finished quickstart run instead of training one
    python benchmarks/bench_export.py --tiny           # seconds-long setting (numbers mean nothing)

Checkpoints: ``recipes/quickstart.yaml`` (tf_efficientnet_lite0 + spinal head, 64 px) and a resnet-family one,
resnet18 (random init: the only offline weights are EfficientNet-Lite's) with a linear head trained on the same
digits split in one stage (:func:`resnet_recipe`). For each, the exports ``finetune export`` makes:

* ``onnxruntime fp32``; ``onnxruntime int8`` (dynamic: ``--quantize int8``); ``onnxruntime int8 static``
  (``--quantize int8 --calibration N``: static int8 with the layer-group sensitivity search,
  :mod:`finetune.deploy.sensitivity`, ``--max-drop 0.01``);
* ``openvino fp32`` and ``openvino int8`` (``--format openvino [--quantize int8 --calibration N]``: NNCF's accuracy
  control); ``openvino int8 qat`` (``... --qat 2``: NNCF's int8 fine-tuned towards fp32 for 2 epochs over the
  calibration images, :mod:`finetune.deploy.openvino`);
* the hub folder (``--format hub``), loaded by ``finetune.load`` and, for the linear head, by plain timm.

Calibration and search images are the CLI's: 2N images of the train split, class by class, the first N
calibrating and the rest judging (never val or test). Every model classifies the run's test split (same images,
same preprocessing): test accuracy, its delta against the PyTorch checkpoint, and the share of top-1 predictions
that agree with it. Then ``finetune.deploy.benchmark`` times every backend on the same random batches, taking
turns call by call, with a second session of the fp32 model (the A/A row) timed in the same turns: the A/A ratio
is the spread to read the speed-ups against.

The goal (issue 26): an int8 model >= 1.5x ONNX Runtime fp32 at batch 32 with <= 1 point of test accuracy lost,
on both checkpoints. A verdict is printed only when the speed-up clears 1.5x by more than the A/A ratio's
distance from 1.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import _common

GOAL_SPEEDUP, GOAL_DROP = 1.5, 0.01
ONNX_ROWS = ("onnxruntime fp32", "onnxruntime int8", "onnxruntime int8 static")
OPENVINO_ROWS = ("openvino fp32", "openvino int8", "openvino int8 qat")
QAT_EPOCHS = 2


def resnet_recipe(quickstart: dict[str, Any], *, tiny: bool) -> dict[str, Any]:
    """resnet18 from random init with a linear head on the quickstart's data and split: one stage, everything."""
    return {
        "name": "digits-resnet18",
        "data": copy.deepcopy(quickstart["data"]),
        "model": {"backbone": "test_resnet" if tiny else "resnet18", "pretrained": False, "head": "linear"},
        "optimizer": {"name": "adamw", "weight_decay": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "stages": [{"name": "all", "epochs": 1 if tiny else 12, "train": "all", "optimizer": {"lr": 2e-3},
                    "batchnorm": "train"}],
        "training": {"seed": 0},
    }


def train(raw: dict[str, Any], run_dir: Path, cache: Path) -> Path:
    from finetune.config import parse_recipe
    from finetune.training.runner import run_training

    raw = copy.deepcopy(raw)
    raw["data"]["num_workers"] = 0
    raw["training"] = {**raw.get("training", {}), "cache_dir": str(cache)}
    recipe = parse_recipe(raw, source="bench_export")
    run_training(recipe, recipe.model_dump(mode="json"), run_dir=run_dir, quiet=True)
    return run_dir


def measure(run: Path, data: Optional[str], tmp: Path, *, calibration: int, batches: list[int], iterations: int,
            threads: int) -> dict[str, Any]:
    """Every export of one run's best checkpoint: accuracy on its test split, file size, export time, latency."""
    import timm
    import torch

    from finetune.data.prepare import split_like_run
    from finetune.deploy.benchmark import benchmark
    from finetune.deploy.export import export_model
    from finetune.deploy.onnx import OnnxModel, quantization_images, read_onnx_info
    from finetune.deploy.openvino import OpenVINOModel, read_openvino_info
    from finetune.inference.predictor import eval_transform, predict_probabilities
    from finetune.models.checkpoint import load_checkpoint, read_meta, resolve_checkpoint, run_folder_of
    from finetune.models.hub_format import timm_classifier

    checkpoint = resolve_checkpoint(run)
    meta = read_meta(checkpoint)
    run_dir = run_folder_of(checkpoint)
    manifest = split_like_run(data or meta["recipe"]["data"]["root"], meta["recipe"]["data"],
                              run_dir and run_dir / "manifest.csv")
    test = manifest.items("test")
    paths, truth = [str(p) for p, _ in test], np.array([label for _, label in test])
    both = quantization_images(checkpoint, 2 * calibration, data)
    calib, judge = both[:calibration], both[calibration:]
    out = Path(tempfile.mkdtemp(prefix="exports-", dir=tmp))
    exports = {
        "onnxruntime fp32": dict(format="onnx", out=out / "fp32.onnx"),
        "onnxruntime int8": dict(format="onnx", quantize="int8", out=out / "int8.onnx"),
        "onnxruntime int8 static": dict(format="onnx", quantize="int8", out=out / "static.onnx",
                                        calibration_images=calib, validation_images=judge, max_drop=GOAL_DROP),
        "openvino fp32": dict(format="openvino", out=out / "openvino"),
        "openvino int8": dict(format="openvino", quantize="int8", out=out / "openvino-int8",
                              calibration_images=calib, validation_images=judge, max_drop=GOAL_DROP),
        "openvino int8 qat": dict(format="openvino", quantize="int8", out=out / "openvino-qat",
                                  calibration_images=calib, validation_images=judge, max_drop=GOAL_DROP,
                                  qat_epochs=QAT_EPOCHS),
        "hub folder": dict(format="hub", out=out / "hub"),
    }
    files, seconds = {}, {}
    for name, kwargs in exports.items():
        start = time.perf_counter()
        files[name] = export_model(checkpoint, **kwargs)
        seconds[name] = time.perf_counter() - start

    transform = eval_transform(meta["preprocessing"])
    model, _ = load_checkpoint(checkpoint)
    models = {"pytorch (checkpoint)": model.eval(),
              **{name: OnnxModel(files[name], threads=threads) for name in ONNX_ROWS},
              **{name: OpenVINOModel(files[name], threads=threads) for name in OPENVINO_ROWS},
              "hub folder (finetune.load)": load_checkpoint(files["hub folder"])[0].eval()}
    linear = bool(timm_classifier(read_meta(files["hub folder"])))
    if linear:
        models["hub folder (plain timm)"] = timm.create_model(f"local-dir:{files['hub folder']}", pretrained=True).eval()
    predictions, accuracy, logits = {}, {}, {}
    for name, m in models.items():
        indices, probs, _ = predict_probabilities(m, paths, transform, batch_size=64)
        predictions[name] = probs.argmax(1)
        accuracy[name] = float((predictions[name] == truth[indices]).mean())
    x = torch.randn(8, *meta["preprocessing"]["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for name in ("pytorch (checkpoint)", "hub folder (finetune.load)", "hub folder (plain timm)"):
            if name in models:
                logits[name] = models[name](x)
    reference = predictions["pytorch (checkpoint)"]
    hub = {"linear_head": linear,
           "max_abs_logit_difference": {name: float((logits[name] - logits["pytorch (checkpoint)"]).abs().max())
                                        for name in logits if name != "pytorch (checkpoint)"},
           "test_predictions_equal": {name: bool((predictions[name] == reference).all())
                                      for name in models if name.startswith("hub folder")}}
    timing = benchmark([checkpoint, *(files[n] for n in (*ONNX_ROWS, *OPENVINO_ROWS, "hub folder"))],
                       batches=batches, threads=threads, iterations=iterations, devices=["cpu"], aa=True)
    sizes = {name: (path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir()))
             / 2**20 for name, path in files.items()}
    quantization = {"onnxruntime int8 static": read_onnx_info(files["onnxruntime int8 static"])["quantization"],
                    **{n: read_openvino_info(files[n])["quantization"] for n in OPENVINO_ROWS[1:]}}
    return {"checkpoint": str(checkpoint), "backbone": meta["backbone"], "head": meta["head"]["name"],
            "input_px": meta["preprocessing"]["input_size"][1], "test_images": len(paths), "accuracy": accuracy,
            "agreement": {n: float((p == reference).mean()) for n, p in predictions.items()},
            "sizes_mb": sizes, "export_seconds": seconds, "quantization": quantization, "hub": hub,
            "benchmark": timing}


def speedups(timing: dict[str, Any]) -> dict[str, dict[str, Optional[float]]]:
    rows = {(r["backend"], r["batch"]): r for r in timing["rows"]}
    out = {}
    for (backend, batch), r in rows.items():
        fp32 = rows.get(("onnxruntime fp32", batch))
        if r["status"] == "ok" and fp32 and fp32["status"] == "ok":
            out[f"{backend}/{batch}"] = fp32["latency_ms"]["median"] / r["latency_ms"]["median"]
    return out


def export_of(model: str) -> str:
    """The export a model row of the accuracy table reads (both hub rows: the one hub folder)."""
    return "hub folder" if model.startswith("hub folder") else model


def verdict(speedup: Optional[float], drop: float, aa: Optional[float]) -> str:
    if speedup is None or aa is None:
        return "not measured"
    margin = abs(aa - 1.0)
    if drop > GOAL_DROP:
        return f"misses (loses {100 * drop:.1f} points)"
    if speedup - margin >= GOAL_SPEEDUP:
        return "meets"
    if speedup + margin < GOAL_SPEEDUP:
        return "misses (too slow)"
    return "within the A/A spread of the goal: no verdict"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished quickstart run folder (default: train one)")
    p.add_argument("--data", help="the runs' data folder (default: the recipe's data.root)")
    p.add_argument("--calibration", type=int, default=256, help="calibration images of static int8 (default 256)")
    p.add_argument("--iterations", type=int, default=30, help="timed calls per backend and batch size")
    p.add_argument("--batch", default="1,32", help="batch sizes (default 1,32)")
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.iterations, args.calibration, args.batch = 3, 16, "2"

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    wall = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        quickstart = yaml.safe_load((_common.REPO_ROOT / "recipes" / "quickstart.yaml").read_text())
        if args.run is None:
            root = _common.digits_folder(tmp, per_class=12 if args.tiny else None)
            quickstart["data"]["root"] = str(root)
            quickstart["data"].pop("sample", None)
            if args.tiny:
                _common.tiny_recipe(quickstart)
                for stage in quickstart["stages"]:
                    stage["epochs"] = 1
            args.run = train(quickstart, tmp / "quickstart", tmp / "cache")
            args.data = str(root)
        else:
            from finetune.models.checkpoint import read_meta, resolve_checkpoint

            quickstart["data"] = read_meta(resolve_checkpoint(args.run))["recipe"]["data"]
            if args.data:
                quickstart["data"]["root"] = args.data
        resnet = train(resnet_recipe(quickstart, tiny=args.tiny), tmp / "resnet18", tmp / "cache")
        for label, run in (("quickstart", args.run), ("resnet18 digits", resnet)):
            results[label] = measure(Path(run), args.data, tmp, calibration=args.calibration, batches=batches,
                                     iterations=args.iterations, threads=args.threads)
    wall = time.perf_counter() - wall

    big = max(batches)
    summary, tables = [], []
    for label, r in results.items():
        ratios, acc = speedups(r["benchmark"]), r["accuracy"]
        aa = r["benchmark"].get("aa_ratio", {}).get(f"cpu/{big}")
        base = acc["pytorch (checkpoint)"]
        groups = r["quantization"]["onnxruntime int8 static"].get("fp32_groups") or []
        parts = []
        for name, what in (("onnxruntime int8 static", f"ONNX Runtime static int8 (fp32 groups: "
                                                        f"{', '.join(groups) or 'none'})"),
                           ("openvino int8", "OpenVINO int8 (NNCF accuracy control)"),
                           ("openvino int8 qat", f"OpenVINO int8 (quantisation-aware, {QAT_EPOCHS} epochs)"),
                           ("onnxruntime int8", "ONNX Runtime dynamic int8")):
            s = ratios.get(f"{name}/{big}")
            parts.append(f"{what} {s if s is not None else float('nan'):.2f}x, accuracy {acc[name]:.4f} "
                         f"({100 * (acc[name] - base):+.1f} points): {verdict(s, base - acc[name], aa)}")
        summary.append(f"{label} ({r['backbone']} + {r['head']} head, {r['input_px']} px, {r['test_images']} test "
                       f"images, fp32 accuracy {base:.4f}), batch {big} vs ONNX Runtime fp32 (A/A ratio "
                       f"{aa if aa is not None else float('nan'):.2f}, one run): " + "; ".join(parts) + ".")
        hub = r["hub"]
        diffs = ", ".join(f"{n} {d:.2g}" for n, d in hub["max_abs_logit_difference"].items())
        same = ", ".join(f"{n} {'equal' if e else 'DIFFERENT'}" for n, e in hub["test_predictions_equal"].items())
        summary.append(f"{label} hub folder: max |logit difference| vs the checkpoint {diffs}; test predictions: "
                       f"{same}.")
        tables.append(_common.table(
            f"{label}: test split ({r['test_images']} images), accuracy, delta and top-1 agreement against the "
            "PyTorch checkpoint; size (MB) and export seconds of each export.",
            ["model", "MB", "test accuracy", "delta vs fp32", "agreement with fp32", "export s"],
            [[name, round(r["sizes_mb"].get(export_of(name), 0.0), 2) or "-", a, a - base, r["agreement"][name],
              round(r["export_seconds"].get(export_of(name), 0.0), 1) or "-"] for name, a in acc.items()]))
        rows = []
        for row in r["benchmark"]["rows"]:
            if row["status"] != "ok":
                rows.append([row["backend"], row["batch"], "-", "-", "-", "-", row["status"]])
                continue
            rows.append([row["backend"], row["batch"], row["latency_ms"]["median"], row["latency_ms"]["p90"],
                         row["images_per_s"], ratios.get(f"{row['backend']}/{row['batch']}"), "ok"])
        tables.append(_common.table(
            f"{label}: latency per call on the CPU, {args.threads} thread(s), {args.iterations} interleaved calls per "
            "backend and batch size; speed-ups are median latency ratios to ONNX Runtime fp32 (the A/A row: a second "
            "session of the same fp32 model).",
            ["backend", "batch", "median ms", "p90 ms", "images/s", "speed-up vs ORT fp32", "status"], rows))
    notes = [
        "Dynamic quantisation (`--quantize int8` without --calibration) quantises the linear layers only "
        "(MatMul/Gemm -> MatMulInteger, activations quantised at run time): on a CNN that is the head.",
        "Static int8 (`--calibration N`) quantises every supported op (QDQ, weights per channel, activations "
        "calibrated at the 99.999th percentile), then measures the top-1 agreement with fp32 on N other train "
        "images and returns layer groups to fp32 (stem, depthwise convolutions, head, four runs of the remaining "
        "blocks), the costliest first, until it is within --max-drop 0.01; results.quantization holds each search's "
        "trace.",
        "OpenVINO int8 is NNCF's quantize_with_accuracy_control with the same images and budget.",
        f"OpenVINO int8 qat (`--format openvino --quantize int8 --qat {QAT_EPOCHS}`) is NNCF's int8 scheme on the "
        f"PyTorch model, calibrated on the same images, then fine-tuned for {QAT_EPOCHS} passes over them to give the "
        "fp32 model's outputs (distillation, no labels) and held to the same budget.",
    ]
    _common.write_result(
        args.out, "export", title="Deployment: int8 (ONNX Runtime, OpenVINO), OpenVINO and hub exports vs fp32",
        command=_common.command_line("bench_export.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"threads": args.threads, "iterations": args.iterations, "batch": args.batch,
                  "calibration": args.calibration, "max_drop": GOAL_DROP, "qat_epochs": QAT_EPOCHS, "tiny": args.tiny},
        summary=summary, tables=tables, results=results, notes=notes,
    )
    return results


if __name__ == "__main__":
    main()
