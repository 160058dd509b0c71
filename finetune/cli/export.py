"""`finetune export CHECKPOINT --format onnx|torchscript|safetensors|hub [--quantize int8]`: a deployable model
plus its labels."""
from __future__ import annotations

from finetune.cli import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint as ONNX, TorchScript or safetensors (with a JSON of labels)",
        description="Export a checkpoint's model. The model takes a float32 N×3×H×W batch named 'input' "
                    "(any N) and returns N×C logits named 'logits'; its own MODEL_FILE.json beside it "
                    "(m.onnx.json, m.pt.json...) holds the class names and the preprocessing.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT|MODEL.onnx",
                   help="checkpoint folder (or a run folder: its best checkpoint); with --quantize also an fp32 "
                        ".onnx finetune exported")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors", "hub"),
                   help="onnx (dynamic batch; run with onnxruntime), torchscript (torch.jit, which PyTorch "
                        "deprecates), safetensors (weights only, rebuilt with finetune.models.create_model), or hub: "
                        "a folder in timm's Hugging Face Hub layout (config.json, model.safetensors, a model card "
                        "README.md) that timm.create_model('local-dir:DIR', pretrained=True) loads (a linear head as timm's own "
                        "classifier; other heads: finetune.load('local-dir:DIR'), timm the backbone); upload it "
                        "with `finetune push`")
    p.add_argument("--out", metavar="PATH",
                   help="model file (default: beside the checkpoint folder, e.g. checkpoints/best.onnx, "
                        "checkpoints/best.int8.onnx with --quantize); for hub, the folder (default checkpoints/best-hub)")
    p.add_argument("--quantize", choices=("int8",),
                   help="int8: quantise the ONNX model with onnxruntime for CPU deployment (dynamic unless "
                        "--calibration is given); `finetune eval MODEL.onnx` states its accuracy cost")
    p.add_argument("--calibration", type=positive_int, metavar="N",
                   help="static int8 quantisation: calibrate activation ranges on N images of the training "
                        "split, spread over the classes (e.g. 256)")
    p.add_argument("--data", metavar="ROOT|MANIFEST",
                   help="where the calibration images are (default: the data the checkpoint's run trained on)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune.errors import FinetuneError
    from finetune.deploy.export import export_model  # lazy: `finetune --help` imports no torch
    from finetune.deploy.onnx import metadata_path, quantization_images

    if (args.calibration or args.data) and not args.quantize:
        raise FinetuneError("--calibration and --data choose the images of static int8 quantisation: add --quantize int8")
    images = quantization_images(args.checkpoint, args.calibration, args.data) if args.calibration else ()
    path = export_model(args.checkpoint, format=args.format, out=args.out, quantize=args.quantize,
                        calibration_images=images)
    if args.format == "hub":
        print(f"wrote {path}/ (config.json, model.safetensors, README.md; load with "
              f"timm.create_model('local-dir:{path}', pretrained=True) or finetune.load('local-dir:{path}'))")
        return 0
    print(f"wrote {path} and {metadata_path(path)}"
          + (f" (int8, {'static: ' + str(len(images)) + ' calibration images' if images else 'dynamic'})"
             if args.quantize else ""))
    return 0
