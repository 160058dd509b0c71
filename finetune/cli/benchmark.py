"""`finetune benchmark CHECKPOINT|MODEL.onnx`: inference latency and throughput, backend by backend."""
from __future__ import annotations

import argparse

from finetune.cli import positive_int, whole_number
from finetune.cli.export import DEFAULT_CALIBRATION


def batch_sizes(text: str) -> list[int]:
    """An argparse ``type``: comma-separated batch sizes (``1,32``)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers separated by commas (got {text!r})") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be batch sizes of 1 or more (got {text!r})")
    return sizes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="latency and throughput: PyTorch eager and compiled, ONNX Runtime fp32 and int8",
        description="Time a model on this machine's CPU (and GPU when there is one): PyTorch eager, "
                    "PyTorch compiled (torch.compile), ONNX Runtime fp32 and int8 (from a checkpoint, the static "
                    "int8 `finetune export --quantize int8` makes, calibrated on its train split; dynamic where "
                    "those images are not here, saying why), the backends taking turns on the same random batch. "
                    "Prints a table; --json writes it all.",
    )
    p.add_argument("model", nargs="+", metavar="CHECKPOINT|MODEL.onnx|OPENVINO_DIR",
                   help="checkpoint or run folder, and/or its .onnx exports (fp32, int8) and OpenVINO export "
                        "folders (rows openvino fp32/int8); what is not given of the ONNX ones is exported from the "
                        "checkpoint (an export names the one it came from)")
    p.add_argument("--batch", type=batch_sizes, default=[1, 32], metavar="B[,B...]",
                   help="batch sizes (default 1,32)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for PyTorch and ONNX Runtime (default: each library's own choice)")
    p.add_argument("--iterations", type=positive_int, default=20, metavar="N",
                   help="timed calls per backend and batch size (default 20)")
    p.add_argument("--device", choices=("cpu", "cuda"), action="append",
                   help="where to run (repeatable; default: the CPU, and the GPU when there is one)")
    p.add_argument("--calibration", type=whole_number(0), default=DEFAULT_CALIBRATION, metavar="N",
                   help=f"int8 exported from the checkpoint: static, calibrated on N images of the train split and "
                        f"searched on N others as `finetune export --quantize int8` does (default {DEFAULT_CALIBRATION}); "
                        f"0: dynamic int8")
    p.add_argument("--data", metavar="ROOT|MANIFEST",
                   help="where those images are (default: the data the checkpoint's run trained on)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os

    from finetune._io import atomic_write_text, check_output
    from finetune.errors import FinetuneError
    from finetune.deploy.benchmark import benchmark, format_table

    if args.json:
        check_output(args.json)
    if args.data and not os.path.exists(args.data):
        raise FinetuneError(f"--data {args.data}: no such file or folder")
    result = benchmark(args.model, batches=args.batch, threads=args.threads, iterations=args.iterations,
                       devices=args.device, calibration=args.calibration, data=args.data)
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
