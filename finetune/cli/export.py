"""`finetune export CHECKPOINT --format onnx|torchscript|safetensors`: a deployable model plus its labels."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint as ONNX, TorchScript or safetensors (with a JSON of labels)",
        description="Export a checkpoint's model. The model takes a float32 N×3×H×W batch named 'input' "
                    "(any N) and returns N×C logits named 'logits'; NAME.json beside it holds the class "
                    "names and the preprocessing.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its best checkpoint)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"),
                   help="onnx (dynamic batch; run with onnxruntime), torchscript (torch.jit, which PyTorch "
                        "deprecates), or safetensors (weights only, rebuilt with finetune.models.create_model)")
    p.add_argument("--out", metavar="PATH",
                   help="model file (default: beside the checkpoint folder, e.g. checkpoints/best.onnx)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune.export import export_model

    path = export_model(args.checkpoint, format=args.format, out=args.out)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0
