"""`finetune export CHECKPOINT --format onnx|torchscript|safetensors [--quantize int8]`: a deployable model
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
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"),
                   help="onnx (dynamic batch; run with onnxruntime), torchscript (torch.jit, which PyTorch "
                        "deprecates), or safetensors (weights only, rebuilt with finetune.models.create_model)")
    p.add_argument("--out", metavar="PATH",
                   help="model file (default: beside the checkpoint folder, e.g. checkpoints/best.onnx, "
                        "checkpoints/best.int8.onnx with --quantize)")
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
    from finetune.deploy.export import export_model
    from finetune.deploy.onnx import metadata_path

    if (args.calibration or args.data) and not args.quantize:
        raise FinetuneError("--calibration and --data choose the images of static int8 quantisation: add --quantize int8")
    images = calibration_images(args.checkpoint, args.calibration, args.data) if args.calibration else ()
    path = export_model(args.checkpoint, format=args.format, out=args.out, quantize=args.quantize,
                        calibration_images=images)
    print(f"wrote {path} and {metadata_path(path)}"
          + (f" (int8, {'static: ' + str(len(images)) + ' calibration images' if images else 'dynamic'})"
             if args.quantize else ""))
    return 0


def calibration_images(checkpoint: str, n: int, data: str | None) -> list:
    """``n`` training images of the checkpoint's run (or of ``data``), spread over the classes."""
    from pathlib import Path

    from finetune.models.checkpoint import read_meta, resolve_checkpoint
    from finetune.cli.eval import load_manifest, run_folder
    from finetune.errors import FinetuneError
    from finetune.deploy.onnx import calibration_subset

    if Path(checkpoint).suffix == ".onnx":  # an fp32 export: the checkpoint it came from knows the data
        from finetune.deploy.onnx import read_onnx_info

        checkpoint = read_onnx_info(checkpoint)["source_checkpoint"]
        if not data and not Path(checkpoint).exists():
            raise FinetuneError(f"static int8 quantisation needs the training images: the export's checkpoint "
                                f"{checkpoint} is not here; give --data ROOT|MANIFEST")
        if not Path(checkpoint).exists():
            return calibration_subset(load_manifest(data, {}, None).items("train"), n)
    folder = resolve_checkpoint(checkpoint)
    meta = read_meta(folder)
    recipe_data = (meta.get("recipe") or {}).get("data") or {}
    data = data or recipe_data.get("root") or recipe_data.get("manifest")
    if not data or not Path(data).exists():
        raise FinetuneError(f"static int8 quantisation needs the training images: the checkpoint's data "
                            f"({data or 'none recorded'}) is not here; give --data ROOT|MANIFEST")
    manifest = load_manifest(data, meta, run_folder(folder))
    if "train" not in manifest.splits():
        raise FinetuneError(f"{data} has no train split to calibrate on")
    return calibration_subset(manifest.items("train"), n)
