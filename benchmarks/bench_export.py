"""int8 export of the quickstart checkpoint: accuracy cost and CPU speed-up against fp32, backend by backend.

    finetune train recipes/quickstart.yaml --out /tmp/qs            # once
    python benchmarks/bench_export.py --run /tmp/qs --data /tmp/qs/../data/digits
    python benchmarks/bench_export.py --run RUN --tiny               # seconds-long setting (numbers mean nothing)

The run's best checkpoint is exported as fp32 ONNX, then quantised to int8 by onnxruntime dynamically
(``finetune export --quantize int8``) and statically (``--calibration 256``: 256 training images, class by
class). Every model classifies the run's test split (same images, same preprocessing): test accuracy, its
delta against the PyTorch checkpoint and the share of top-1 predictions that agree with it. Then
``finetune.deploy.benchmark`` times PyTorch eager, PyTorch compiled, ONNX Runtime fp32 and both int8 models on the
same random batches, the backends taking turns call by call (median and 90th-percentile latency).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import _common


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished quickstart run folder")
    p.add_argument("--data", help="the run's data folder (default: the recipe's data.root)")
    p.add_argument("--calibration", type=int, default=256, help="calibration images of static int8 (default 256)")
    p.add_argument("--iterations", type=int, default=30, help="timed calls per backend and batch size")
    p.add_argument("--batch", default="1,32", help="batch sizes (default 1,32)")
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.iterations, args.calibration, args.batch = 3, 16, "1"

    import torch

    from finetune.deploy.benchmark import benchmark
    from finetune.models.checkpoint import load_checkpoint, read_meta, resolve_checkpoint
    from finetune.cli.eval import load_manifest
    from finetune.deploy.export import export_model
    from finetune.deploy.onnx import OnnxModel, quantization_sample
    from finetune.inference.predictor import eval_transform, predict_probabilities

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    checkpoint = resolve_checkpoint(args.run)
    meta = read_meta(checkpoint)
    manifest = load_manifest(args.data or meta["recipe"]["data"]["root"], meta, args.run)
    test = manifest.items("test")
    paths, truth = [str(p) for p, _ in test], np.array([label for _, label in test])
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        files, seconds = {}, {}
        for name, source, kwargs in (
            ("onnxruntime fp32", checkpoint, {}),
            ("onnxruntime int8", None, {"quantize": "int8"}),
            ("onnxruntime int8 static", None, {"quantize": "int8", "calibration_images": quantization_sample(
                manifest.items("train"), args.calibration)}),
        ):
            start = time.perf_counter()
            files[name] = export_model(source or files["onnxruntime fp32"], format="onnx",
                                       out=Path(tmp, name.replace(" ", "_") + ".onnx"), **kwargs)
            seconds[name] = round(time.perf_counter() - start, 1)

        transform = eval_transform(meta["preprocessing"])
        model, _ = load_checkpoint(checkpoint)
        models = {"pytorch (checkpoint)": model.eval(),
                  **{name: OnnxModel(path, threads=args.threads) for name, path in files.items()}}
        predictions, accuracy = {}, {}
        for name, m in models.items():
            indices, probs, _ = predict_probabilities(m, paths, transform, batch_size=64)
            predictions[name] = probs.argmax(1)
            accuracy[name] = float((predictions[name] == truth[indices]).mean())
        sizes = {name: path.stat().st_size / 2**20 for name, path in files.items()}
        timing = benchmark([checkpoint, *files.values()], batches=[int(b) for b in args.batch.split(",")],
                           threads=args.threads, iterations=args.iterations, devices=["cpu"])
    wall = time.perf_counter() - wall

    reference = predictions["pytorch (checkpoint)"]
    accuracy_rows = [[name, round(sizes.get(name, 0.0), 2) or "-", accuracy[name],
                      accuracy[name] - accuracy["pytorch (checkpoint)"],
                      float((predictions[name] == reference).mean()), seconds.get(name, "-")] for name in models]
    rows = {(r["backend"], r["batch"]): r for r in timing["rows"]}
    batches = sorted({r["batch"] for r in timing["rows"]})
    latency_rows, speedups = [], {}
    for (backend, batch), r in rows.items():
        if r["status"] != "ok":
            latency_rows.append([backend, batch, "-", "-", "-", "-", "-", r["status"]])
            continue
        fp32, eager = rows[("onnxruntime fp32", batch)], rows[("pytorch eager", batch)]
        vs_fp32 = fp32["latency_ms"]["median"] / r["latency_ms"]["median"] if fp32["status"] == "ok" else None
        vs_eager = eager["latency_ms"]["median"] / r["latency_ms"]["median"] if eager["status"] == "ok" else None
        speedups[f"{backend}/{batch}"] = {"vs_onnxruntime_fp32": vs_fp32, "vs_pytorch_eager": vs_eager}
        latency_rows.append([backend, batch, r["latency_ms"]["median"], r["latency_ms"]["p90"], r["images_per_s"],
                             vs_fp32, vs_eager, "ok"])

    def speed(backend: str) -> str:
        return ", ".join(f"{speedups.get(f'{backend}/{b}', {}).get('vs_onnxruntime_fp32') or float('nan'):.2f}x at "
                         f"batch {b}" for b in batches)

    summary = [
        f"int8 dynamic (`finetune export --quantize int8`): {speed('onnxruntime int8')} over ONNX Runtime fp32; "
        f"test accuracy {accuracy['onnxruntime int8']:.4f} vs {accuracy['pytorch (checkpoint)']:.4f} fp32 "
        f"(delta {accuracy['onnxruntime int8'] - accuracy['pytorch (checkpoint)']:+.4f}, {len(paths)} images); "
        f"{sizes['onnxruntime int8']:.1f} MB vs {sizes['onnxruntime fp32']:.1f} MB.",
        f"int8 static (`--calibration {args.calibration}`): {speed('onnxruntime int8 static')} over ONNX Runtime "
        f"fp32; test accuracy {accuracy['onnxruntime int8 static']:.4f} (delta "
        f"{accuracy['onnxruntime int8 static'] - accuracy['pytorch (checkpoint)']:+.4f}).",
    ]
    tables = [
        _common.table(f"Test split of the run ({len(paths)} images): accuracy, delta and top-1 agreement against the "
                      "PyTorch checkpoint; export seconds include the fp32 export for the checkpoint row.",
                      ["model", "file MB", "test accuracy", "delta vs fp32", "agreement with fp32", "export s"],
                      accuracy_rows),
        _common.table(f"Latency per call on the CPU, {args.threads} thread(s), {args.iterations} interleaved calls per "
                      "backend and batch size; speed-ups are median latency ratios.",
                      ["backend", "batch", "median ms", "p90 ms", "images/s", "speed-up vs ORT fp32",
                       "speed-up vs eager", "status"], latency_rows),
    ]
    notes = [
        f"Model: {meta['backbone']} + {meta['head']['name']} head at {meta['preprocessing']['input_size'][1]} px, "
        f"checkpoint {checkpoint}.",
        "Dynamic quantisation (the default) quantises the linear layers only (MatMul/Gemm -> MatMulInteger, activations "
        "quantised at run time): on this CNN that is the head, so it costs no accuracy and gains little speed. "
        "Quantising the convolutions dynamically too (ConvInteger, onnxruntime's default op list) ran 8-14x slower "
        "than fp32 and lost 7.1 points (0.9182 vs 0.9888, measured once at commit 1d7d896, before the default changed).",
        "Static quantisation quantises every supported op (QuantizeLinear/DequantizeLinear pairs, QDQ, that "
        "onnxruntime fuses into int8 kernels), weights per channel, activations calibrated at the 99.999th "
        "percentile; min-max calibration lost 6.3 points, entropy 6.3 (measured once on this checkpoint). "
        "EfficientNet-Lite's depthwise convolutions are known to quantise poorly after training; "
        "quantisation-aware training is not implemented.",
    ]
    results = {"accuracy": accuracy, "sizes_mb": sizes, "export_seconds": seconds, "speedups": speedups,
               "benchmark": timing, "test_images": len(paths)}
    _common.write_result(
        args.out, "export", title="int8 export: accuracy cost and CPU speed-up (quickstart checkpoint)",
        command=_common.command_line("bench_export.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"threads": args.threads, "iterations": args.iterations, "batch": args.batch,
                  "calibration": args.calibration, "tiny": args.tiny},
        summary=summary, tables=tables, results=results, notes=notes,
    )
    return results


if __name__ == "__main__":
    main()
