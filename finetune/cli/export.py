"""`finetune export CHECKPOINT --format onnx|torchscript|safetensors|hub [--quantize int8]`: a deployable model
plus its labels."""
from __future__ import annotations

import json

from finetune.cli import whole_number

DEFAULT_CALIBRATION = 256
"""Training images static int8 calibrates on, and as many again that its accuracy search judges on."""


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
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors", "hub", "openvino"),
                   help="onnx (dynamic batch; run with onnxruntime), torchscript (torch.jit, which PyTorch "
                        "deprecates), safetensors (weights only, rebuilt with finetune.models.create_model), or hub: "
                        "a folder in timm's Hugging Face Hub layout (config.json, model.safetensors, a model card "
                        "README.md) that timm.create_model('local-dir:DIR', pretrained=True) loads (a linear head as timm's own "
                        "classifier; other heads: finetune.load('local-dir:DIR'), timm the backbone); upload it "
                        "with `finetune push`), or openvino: a folder of OpenVINO IR (model.xml/.bin, model.json; "
                        "pip install 'finetune[openvino]'); with --quantize int8, NNCF's accuracy-controlled int8")
    p.add_argument("--out", metavar="PATH",
                   help="model file (default: beside the checkpoint folder, e.g. checkpoints/best.onnx, "
                        "checkpoints/best.int8.onnx with --quantize); for hub, the folder (default checkpoints/best-hub)")
    p.add_argument("--quantize", choices=("int8",),
                   help="int8 for CPU deployment: static (onnxruntime, or NNCF with --format openvino), the "
                        "costliest layer groups kept in fp32 until within --max-drop; `finetune eval MODEL.onnx` "
                        "states its accuracy cost")
    p.add_argument("--calibration", type=whole_number(0), metavar="N",
                   help=f"static int8: calibrate activation ranges on N images of the training split, spread over "
                        f"the classes, and judge the accuracy search on N others (default {DEFAULT_CALIBRATION}); "
                        f"--format onnx --calibration 0: dynamic int8 instead (the linear layers only, no images "
                        f"needed)")
    p.add_argument("--max-drop", type=float, default=0.01, metavar="D",
                   help="static int8 (--format onnx --calibration N, or --format openvino): how far below 1 the int8 "
                        "model's score against the fp32 model, on a validation sample of the train split, the search "
                        "may leave (onnx: the share of fp32 decisions kept with margin, layer groups back to fp32 most "
                        "costly first; openvino: top-1 agreement, NNCF's accuracy control; default 0.01)")
    p.add_argument("--qat", type=whole_number(1), metavar="EPOCHS",
                   help="--format openvino --quantize int8: quantisation-aware fine-tuning instead of post-training "
                        "quantisation, for a model that cannot otherwise stay within --max-drop: NNCF's int8 model "
                        "fine-tuned for EPOCHS passes over the calibration images to give the fp32 model's outputs "
                        "(distillation, lr 1e-5); the export's JSON says which one ran")
    p.add_argument("--data", metavar="ROOT|MANIFEST",
                   help="where the calibration images are (default: the data the checkpoint's run trained on)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune.errors import FinetuneError
    from finetune.deploy.export import export_model  # lazy: `finetune --help` imports no torch
    from finetune.deploy.onnx import metadata_path, quantization_split, read_onnx_info

    if (args.calibration is not None or args.data) and not args.quantize:
        raise FinetuneError("--calibration and --data choose the images of static int8 quantisation: add --quantize int8")
    if args.calibration == 0 and args.format == "openvino":
        raise FinetuneError("OpenVINO int8 is static: --calibration must be 1 or more")
    if args.qat and (args.format != "openvino" or not args.quantize):
        raise FinetuneError("--qat (quantisation-aware fine-tuning) is for --format openvino --quantize int8")
    if not 0 < args.max_drop < 1:
        raise FinetuneError(f"--max-drop must be between 0 and 1, got {args.max_drop}")
    validation: list = []
    images: tuple | list = ()
    if args.quantize and args.calibration != 0 and args.format in ("onnx", "openvino"):
        # static: the accuracy searches (NNCF's, finetune.deploy.sensitivity's) need a validation sample too, both
        # from the train split, disjoint
        images, validation = quantization_split(args.checkpoint, args.calibration or DEFAULT_CALIBRATION, args.data)
    path = export_model(args.checkpoint, format=args.format, out=args.out, quantize=args.quantize,
                        calibration_images=images, validation_images=validation, max_drop=args.max_drop,
                        qat_epochs=args.qat or 0)
    if args.format == "openvino":
        done = ""
        if args.quantize:
            q = json.loads((path / "model.json").read_text(encoding="utf-8"))["quantization"]
            done = (f" (int8, {q['method']}" + (f", {q['epochs']} epoch(s): agreement with fp32 "
                                                f"{q['agreement_before_fine_tuning']:.4f} before fine-tuning,"
                                                if "epochs" in q else ":")
                    + f" {q['agreement_with_fp32']:.4f} on {q['validation_images']} training images)")
        print(f"wrote {path}/ (model.xml, model.bin, model.json){done}")
        return 0
    if args.format == "hub":
        print(f"wrote {path}/ (config.json, model.safetensors, README.md; load with "
              f"timm.create_model('local-dir:{path}', pretrained=True) or finetune.load('local-dir:{path}'))")
        return 0
    done = ""
    if args.quantize and images:
        q = read_onnx_info(path)["quantization"]
        done = f" (int8, static: {len(images)} calibration images"
        if "agreement_with_fp32" in q:  # the search ran (absent: no readable validation images)
            done += (f"; on {q['validation_images']} others, top-1 agreement with fp32 {q['agreement_with_fp32']:.4f}, "
                     f"decisions kept with margin {q['kept_with_margin']:.4f}; layer groups kept in fp32: "
                     f"{', '.join(q['fp32_groups']) or 'none'}")
        done += ")"
    elif args.quantize:
        done = " (int8, dynamic: the linear layers)"
    print(f"wrote {path} and {metadata_path(path)}{done}")
    return 0
