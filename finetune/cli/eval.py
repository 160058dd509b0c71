"""`finetune eval CHECKPOINT|MODEL.onnx --data ROOT|MANIFEST`: metrics, confusion matrices and report.html."""
from __future__ import annotations

from pathlib import Path

from finetune._workers import workers_arg
from finetune.cli import positive_int

SPLIT_HELP = (
    "which images of --data to evaluate: train, val, test (default) or all. A folder is split the way the "
    "checkpoint's run split it: with the run's manifest.csv when all its files are under ROOT, else with "
    "the recipe's split options (seed, val, test, card)."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: metrics, per-class table, confusion matrices, report.html",
        description="Evaluate a checkpoint on labelled images and write metrics.json, per_class.csv, "
                    "confusion_matrix.csv/.png, most_confused.csv, misclassified.csv and report.html.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT|MODEL.onnx|OPENVINO_DIR",
                   help="checkpoint folder (or a run folder: its best checkpoint), or a model `finetune export "
                        "--format onnx` wrote (run with onnxruntime), or the folder `--format openvino` wrote (run "
                        "with OpenVINO); its accuracy is compared with the fp32 checkpoint it came from")
    p.add_argument("--data", required=True, metavar="ROOT|MANIFEST", help="image folder or manifest CSV")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"), help=SPLIT_HELP)
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: RUN_DIR/eval-SPLIT for a run's checkpoint, else CHECKPOINT-eval-SPLIT)")
    p.add_argument("--allow-subset", action="store_true",
                   help="evaluate the classes the data shares with the checkpoint when their classes differ")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--num-workers", type=workers_arg, default="auto",
                   help="image-decoding worker processes, or auto: the CPU cores, at most 8 (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="no Grad-CAM heat-maps in report.html (each costs about two predictions on the CPU)")
    p.add_argument("--tta", choices=("hflip", "crops", "hflip+crops"),
                   help="also evaluate with test-time augmentation, averaging the softmax over the image and its "
                        "mirror image (hflip), its 4 corner crops (crops), or both (10 views); metrics.json "
                        "and report.html show both")
    p.add_argument("--reference", metavar="CHECKPOINT",
                   help="for an .onnx model: the checkpoint to compare accuracy with (default: the one it was "
                        "exported from, when it is still there)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune._io import check_output  # lazy, as in every command: `finetune --help` imports no torch
    from finetune.data.prepare import split_like_run
    from finetune.models.checkpoint import load_checkpoint, resolve_checkpoint, run_folder_of
    from finetune.inference.temperature import meta_temperature
    from finetune.evaluation import align_classes, evaluate
    from finetune._device import resolve_device

    from finetune.deploy.openvino import is_openvino_folder

    if Path(args.checkpoint).suffix == ".onnx" or is_openvino_folder(args.checkpoint):
        return run_onnx(args)
    if args.reference:
        from finetune.errors import FinetuneError

        raise FinetuneError("--reference compares an exported .onnx model with a checkpoint; give the .onnx file")
    folder = resolve_checkpoint(args.checkpoint)
    run_dir = run_folder_of(folder)
    out = Path(args.out) if args.out else (
        run_dir / f"eval-{args.split}" if run_dir else folder.with_name(f"{folder.name}-eval-{args.split}")
    )
    check_output(out, folder=True)  # before scanning the data and running the model
    device = resolve_device(args.device)
    model, meta = load_checkpoint(folder, map_location=device)
    if meta.get("task") == "multilabel":
        return run_multilabel(args, model, meta, folder, run_dir, out, device)
    manifest = split_like_run(args.data, _recipe_data(meta), run_dir and run_dir / "manifest.csv")
    mapping = align_classes(manifest.classes, meta["classes"], allow_subset=args.allow_subset)
    splits = manifest.splits() if args.split == "all" else [args.split]
    items = [(path, mapping[label]) for split in splits for path, label in manifest.items(split) if label in mapping]
    subset = len(mapping) < len(meta["classes"])
    metrics = evaluate(
        model, items, class_names=meta["classes"], preprocessing=meta["preprocessing"], out_dir=out,
        device=device, batch_size=args.batch_size, num_workers=args.num_workers, run_dir=run_dir,
        labels=sorted(mapping.values()) if subset else None, progress=True, explain=args.explain,
        temperature=meta_temperature(meta), tta=args.tta,
        details={
            "checkpoint": str(folder), "model": f"{meta['backbone']} + {meta['head']['name']} head",
            "data": str(args.data), "split": args.split,
            "classes evaluated": f"{len(mapping)} of {len(meta['classes'])}",
        },
    )
    print(
        f"{metrics['num_samples']} images: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"balanced accuracy {metrics['balanced_accuracy']:.4f}, top-5 {metrics['top5_accuracy']:.4f}, "
        f"ECE {metrics['ece']:.4f}"
        + (f" ({metrics['num_unreadable']} unreadable image(s) left out)" if metrics["num_unreadable"] else "")
    )
    if "tta" in metrics:
        print(f"with {args.tta} TTA: accuracy {metrics['tta']['accuracy']:.4f}, macro-F1 "
              f"{metrics['tta']['macro_f1']:.4f}, ECE {metrics['tta']['ece']:.4f}")
    print(f"wrote {out}/ (open {out / 'report.html'})")
    return 0


def run_multilabel(args, model, meta, folder, run_dir, out, device) -> int:
    """`finetune eval` of a multi-label checkpoint: mAP, per-label tables and the report at its thresholds."""
    from finetune.evaluation.multilabel_evaluator import evaluate_multilabel
    from finetune.inference.temperature import meta_temperatures

    items = _multilabel_items(args, meta, meta["classes"], run_dir)
    metrics = evaluate_multilabel(
        model, items, class_names=meta["classes"], preprocessing=meta["preprocessing"], out_dir=out,
        thresholds=meta.get("thresholds"), temperatures=meta_temperatures(meta), device=device,
        batch_size=args.batch_size, num_workers=args.num_workers, run_dir=run_dir, progress=True, explain=args.explain,
        details={"checkpoint": str(folder), "model": f"{meta['backbone']} + {meta['head']['name']} head (multi-label)",
                 "data": str(args.data), "split": args.split},
    )
    print(f"{metrics['num_samples']} images: mAP {metrics['map_macro']:.4f} (micro {metrics['map_micro']:.4f}), "
          f"micro-F1 {metrics['f1_micro']:.4f}, subset accuracy {metrics['subset_accuracy']:.4f}, Hamming loss "
          f"{metrics['hamming_loss']:.4f}"
          + (f" ({metrics['num_unreadable']} unreadable image(s) left out)" if metrics["num_unreadable"] else ""))
    print(f"wrote {out}/ (open {out / 'report.html'})")
    return 0


def run_onnx(args) -> int:
    """Evaluate an exported ONNX model (onnxruntime), and state its accuracy against the fp32 checkpoint."""
    import numpy as np

    from finetune._io import check_output  # lazy: `finetune --help` imports no torch
    from finetune.data.prepare import split_like_run
    from finetune.models.checkpoint import load_checkpoint, read_meta, resolve_checkpoint, run_folder_of, write_json_atomic
    from finetune.errors import FinetuneError
    from finetune.evaluation import align_classes, classification_metrics, evaluate
    from finetune.deploy.onnx import OnnxModel, read_onnx_info
    from finetune.inference.predictor import eval_transform, predict_probabilities, resolve_device

    from finetune.deploy.openvino import OpenVINOModel, is_openvino_folder, read_openvino_info

    path = Path(args.checkpoint)
    openvino = is_openvino_folder(path)
    info = read_openvino_info(path) if openvino else read_onnx_info(path)
    reference = args.reference or info.get("source_checkpoint")
    if reference and not args.reference and not Path(reference).exists():
        reference = None  # exported elsewhere: nothing to compare with unless --reference is given
    folder = resolve_checkpoint(reference) if reference else None
    run_dir = run_folder_of(folder) if folder else None
    out = Path(args.out) if args.out else path.with_name(f"{path.stem}-eval-{args.split}")
    check_output(out, folder=True)
    device = resolve_device(args.device)
    model = OpenVINOModel(path) if openvino else OnnxModel(path, device=device.type)
    meta = read_meta(folder) if folder else info
    if folder and list(meta["classes"]) != list(info["classes"]):
        raise FinetuneError(f"{path} and the reference checkpoint {folder} have different classes")
    if info.get("task") == "multilabel":
        return run_onnx_multilabel(args, model, info, meta, folder, run_dir, out, device)
    manifest = split_like_run(args.data, _recipe_data(meta), run_dir and run_dir / "manifest.csv")
    mapping = align_classes(manifest.classes, info["classes"], allow_subset=args.allow_subset)
    splits = manifest.splits() if args.split == "all" else [args.split]
    items = [(p, mapping[label]) for split in splits for p, label in manifest.items(split) if label in mapping]
    labels = sorted(mapping.values()) if len(mapping) < len(info["classes"]) else None
    ref = None
    if folder:  # the fp32 checkpoint on the same images, first: the report lists it
        fp32, _ = load_checkpoint(folder, map_location=device)
        indices, probs, _ = predict_probabilities(
            fp32.eval(), [str(p) for p, _ in items], eval_transform(meta["preprocessing"]), device=device,
            batch_size=args.batch_size, num_workers=args.num_workers)
        if len(indices):
            targets = np.array([t for _, t in items])[indices]
            ref = classification_metrics(targets, probs, class_names=info["classes"], labels=labels)
    quantization = info.get("quantization")
    metrics = evaluate(
        model, items, class_names=info["classes"], preprocessing=info["preprocessing"], out_dir=out,
        device="cpu", batch_size=args.batch_size, num_workers=args.num_workers, run_dir=run_dir, labels=labels,
        progress=True, tta=args.tta,
        details={
            "model": f"{path} ({info['backbone']} + {info['head']['name']} head, {'OpenVINO' if openvino else 'ONNX'}"
                     + (f" {quantization['dtype']} {quantization['method']})" if quantization else ")"),
            "data": str(args.data), "split": args.split,
            "classes evaluated": f"{len(mapping)} of {len(info['classes'])}",
            **({"fp32 checkpoint": f"{folder}: accuracy {ref['accuracy']:.4f}, macro-F1 {ref['macro_f1']:.4f}"}
               if ref else {}),
        },
    )
    line = (f"{metrics['num_samples']} images: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
            f"balanced accuracy {metrics['balanced_accuracy']:.4f}, top-5 {metrics['top5_accuracy']:.4f}, "
            f"ECE {metrics['ece']:.4f}")
    if ref:
        metrics["reference"] = {
            "checkpoint": str(folder), "accuracy": ref["accuracy"], "macro_f1": ref["macro_f1"],
            "accuracy_delta": metrics["accuracy"] - ref["accuracy"],
            "macro_f1_delta": metrics["macro_f1"] - ref["macro_f1"],
        }
        write_json_atomic(out / "metrics.json", metrics)
        line += (f"; fp32 checkpoint {folder}: accuracy {ref['accuracy']:.4f}, "
                 f"delta {metrics['reference']['accuracy_delta']:+.4f}")
    print(line)
    print(f"wrote {out}/ (open {out / 'report.html'})")
    return 0


def run_onnx_multilabel(args, model, info, meta, folder, run_dir, out, device) -> int:
    """`finetune eval MODEL.onnx` of a multi-label export: its probabilities at the thresholds in its metadata, and
    its mAP against the checkpoint it came from."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score

    from finetune.evaluation.multilabel_evaluator import evaluate_multilabel
    from finetune.inference.predictor import eval_transform, predict_probabilities
    from finetune.inference.temperature import meta_temperatures, sigmoid
    from finetune.models.checkpoint import load_checkpoint, write_json_atomic

    items = _multilabel_items(args, meta, info["classes"], run_dir)
    ref = None
    if folder:  # the checkpoint on the same images first, at its own (calibrated) probabilities
        fp32, _ = load_checkpoint(folder, map_location=device)
        indices, logits, _ = predict_probabilities(
            fp32.eval(), [str(p) for p, _ in items], eval_transform(meta["preprocessing"]), device=device,
            batch_size=args.batch_size, num_workers=args.num_workers, logits=True)
        if len(indices):
            y = np.stack([t for _, t in items])[indices]
            ref = float(average_precision_score(y[:, y.sum(0) > 0], sigmoid(logits, meta_temperatures(meta))[:, y.sum(0) > 0],
                                                average="macro"))

    class Logits(torch.nn.Module):  # the export gives probabilities; the evaluator takes logits to apply sigmoid to
        def forward(self, images):
            return torch.logit(model(images).double().clamp(1e-12, 1 - 1e-12))

    quantization = info.get("quantization")
    metrics = evaluate_multilabel(
        Logits(), items, class_names=info["classes"], preprocessing=info["preprocessing"], out_dir=out,
        thresholds=info.get("thresholds"), device="cpu", batch_size=args.batch_size, num_workers=args.num_workers,
        run_dir=run_dir, progress=True, explain=False,
        details={"model": f"{args.checkpoint} ({info['backbone']} + {info['head']['name']} head, multi-label ONNX"
                          + (f" {quantization['dtype']} {quantization['method']})" if quantization else ")"),
                 "data": str(args.data), "split": args.split,
                 **({"checkpoint": f"{folder}: mAP {ref:.4f}"} if ref is not None else {})},
    )
    line = f"{metrics['num_samples']} images: mAP {metrics['map_macro']:.4f}, micro-F1 {metrics['f1_micro']:.4f}"
    if ref is not None:
        metrics["reference"] = {"checkpoint": str(folder), "map_macro": ref, "map_macro_delta": metrics["map_macro"] - ref}
        write_json_atomic(out / "metrics.json", metrics)
        line += f"; checkpoint {folder}: mAP {ref:.4f}, delta {metrics['reference']['map_macro_delta']:+.4f}"
    print(line)
    print(f"wrote {out}/ (open {out / 'report.html'})")
    return 0


def _multilabel_items(args, meta: dict, classes: list, run_dir) -> list:
    """The ``(path, multi-hot target)`` images of ``--split`` for a multi-label model, refusing the single-label
    options."""
    from finetune.data.multilabel import labels_like_run, targets_for
    from finetune.errors import FinetuneError

    if args.tta or args.allow_subset:
        raise FinetuneError(f"{'--tta' if args.tta else '--allow-subset'} is for single-label models; this one is "
                            "multi-label")
    table = labels_like_run(args.data, _recipe_data(meta), run_dir and run_dir / "manifest.csv")
    splits = table.splits() if args.split == "all" else [args.split]
    items = targets_for(table, splits, classes)
    if not items:
        raise FinetuneError(f"no images in the {args.split} split of {args.data} (splits: {', '.join(table.splits())})")
    return items


def _recipe_data(meta: dict) -> dict:
    return (meta.get("recipe") or {}).get("data") or {}
