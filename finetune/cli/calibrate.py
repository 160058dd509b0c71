"""`finetune calibrate CHECKPOINT --data ROOT|MANIFEST`: fit the checkpoint's temperature on labelled images."""
from __future__ import annotations

from finetune._workers import workers_arg
from finetune.cli import positive_int
from finetune.cli.eval import SPLIT_HELP


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit a checkpoint's temperature (calibrated probabilities) on labelled images",
        description="Fit the temperature T that makes softmax(logits / T) calibrated (Guo et al. 2017: LBFGS on "
                    "the negative log-likelihood) on labelled images, usually the validation split, and store it in "
                    "the checkpoint; predict, eval, finetune.load and exports then apply it. Predicted classes do "
                    "not change. A multi-label checkpoint gets one temperature per label (sigmoid(logit / T_c), "
                    "fitted on the binary cross-entropy), its thresholds moved to the calibrated scale so its "
                    "predicted labels do not change either.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its best checkpoint)")
    p.add_argument("--data", required=True, metavar="ROOT|MANIFEST", help="image folder or manifest CSV")
    p.add_argument("--split", default="val", choices=("train", "val", "test", "all"),
                   help=SPLIT_HELP.replace("val, test (default)", "val (default), test").replace("to evaluate", "to fit on"))
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--num-workers", type=workers_arg, default="auto",
                   help="image-decoding worker processes, or auto: the CPU cores, at most 8 (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune._device import resolve_device  # lazy: `finetune --help` imports no torch
    from finetune.data.prepare import split_like_run
    from finetune.models.checkpoint import read_meta, resolve_checkpoint, run_folder_of
    from finetune.evaluation import align_classes
    from finetune.evaluation.calibrate import calibrate_checkpoint

    folder = resolve_checkpoint(args.checkpoint)
    meta = read_meta(folder)
    run_dir = run_folder_of(folder)
    recipe_data = (meta.get("recipe") or {}).get("data") or {}
    if meta.get("task") == "multilabel":
        from finetune.data.multilabel import labels_like_run, targets_for
        from finetune.evaluation.calibrate import calibrate_multilabel_checkpoint

        table = labels_like_run(args.data, recipe_data, run_dir and run_dir / "manifest.csv")
        items = targets_for(table, table.splits() if args.split == "all" else [args.split], meta["classes"])
        result = calibrate_multilabel_checkpoint(folder, items, device=resolve_device(args.device),
                                                 batch_size=args.batch_size, num_workers=args.num_workers)
        print(f"{result['num_samples']} images, multi-label: per-label temperatures "
              f"{', '.join(f'{t:.3f}' for t in result['temperatures'])}; ECE (mean over labels) "
              f"{result['ece_before']:.4f} -> {result['ece_after']:.4f}, binary cross-entropy "
              f"{result['loss_before']:.4f} -> {result['loss_after']:.4f}")
        print(f"wrote the temperatures, and the thresholds moved to their scale (the same labels predicted), into "
              f"{folder}/checkpoint.json")
        return 0
    manifest = split_like_run(args.data, recipe_data, run_dir and run_dir / "manifest.csv")
    mapping = align_classes(manifest.classes, meta["classes"])
    splits = manifest.splits() if args.split == "all" else [args.split]
    items = [(path, mapping[label]) for split in splits for path, label in manifest.items(split)]
    result = calibrate_checkpoint(folder, items, device=resolve_device(args.device), batch_size=args.batch_size,
                                  num_workers=args.num_workers)
    print(f"{result['num_samples']} images: temperature {result['temperature']:.4f}, ECE {result['ece_before']:.4f} "
          f"-> {result['ece_after']:.4f}, NLL {result['loss_before']:.4f} -> {result['loss_after']:.4f}")
    print(f"wrote the temperature into {folder}/checkpoint.json")
    return 0
