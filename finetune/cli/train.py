"""`finetune train`: run a recipe, a quick default recipe, or resume a run."""
from __future__ import annotations

from pathlib import Path

DEFAULT_STAGES_HELP = (
    "Without a recipe, --data and --backbone make the default recipe: "
    "stage 'head' (3 epochs, AdamW lr 1e-3, head only, from one cached view of the train transform), "
    "then stage 'all' (7 epochs, lr 1e-3, everything, layer decay 0.8); cosine schedules with 1 warmup epoch, "
    "backbone BatchNorm statistics frozen (batchnorm: eval), an EMA of the weights validated and kept "
    "(training.ema 0.999 with ema_warmup), a 0.7/0.15/0.15 split when the folder is not "
    "pre-split; augmentation and Mixup/CutMix chosen by input size (data.augment: auto, training.mixup: auto). "
    "Multi-label data (a labels CSV) gets one stage instead: 'all' (12 epochs, AdamW lr 2e-3 for the linear head, "
    "1e-3 for the others, constant, everything, BatchNorm in train mode, no EMA) and the linear head unless --head "
    "says otherwise, which reached a higher val mAP than the staged schedule and the spinal head on the multi-label "
    "benchmark (benchmarks/bench_multilabel.py)."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a backbone (from a recipe, or from --data/--backbone)",
        description="Fine-tune a timm backbone with a finetune head. " + DEFAULT_STAGES_HELP,
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set stages.0.epochs=2 --set data.root=/path")
    p.add_argument("--out", help="run folder (default: the recipe's output.dir)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--data", help="image folder or manifest (without a recipe)")
    p.add_argument("--labels", metavar="CSV",
                   help="multi-label data: a CSV of path,labels[,split] (labels separated by ';') for the images "
                        "under --data ROOT (without a recipe; in a recipe: data.manifest)")
    p.add_argument("--backbone", help="timm backbone name (without a recipe)")
    p.add_argument("--head", help="head: spinal, linear or mlp (default spinal; linear for multi-label data)")
    p.add_argument("--pretrained", default="false",
                   help="true (timm hub), offline, a weights file, or false (default: false)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only epoch lines")
    p.set_defaults(func=run)


def default_recipe(data: str, backbone: str, head: str | None, pretrained: str, labels: str | None = None) -> dict:
    """The documented defaults for `finetune train --data ROOT --backbone NAME [--labels CSV]`: the staged
    schedule (:func:`staged_defaults`), or for multi-label data (a labels CSV) :func:`multilabel_defaults`.
    ``head`` None: spinal, or linear for multi-label data (on bench_multilabel.py the linear head reached a higher
    val mAP than the spinal one in the same epochs)."""
    from finetune.data.multilabel import is_labels_csv

    if labels:
        source = {"root": data, "manifest": labels}
    else:
        source = {"manifest": data} if data.lower().endswith(".csv") else {"root": data}
    if is_labels_csv(labels or data):
        return multilabel_defaults(source, f"{Path(data).name or 'data'}-{backbone}", backbone, head or "linear",
                                   pretrained)
    return staged_defaults(source, f"{Path(data).name or 'data'}-{backbone}", backbone, head or "spinal", pretrained)


def multilabel_defaults(source: dict, name: str, backbone: str, head: str, pretrained: str) -> dict:
    """One stage training everything at a constant lr, BatchNorm in train mode, no EMA: on the digit-mosaic
    benchmark (bench_multilabel.py, which runs both) it reached a higher val mAP than :func:`staged_defaults`, whose
    head-first stage, frozen BatchNorm statistics and EMA (chosen on single-label photos near ImageNet) held the
    multi-label model back. The lr: 2e-3 for the linear head, the highest best-epoch val mAP of 1e-3, 2e-3, 3e-3 and
    5e-3 constant and 3e-3 cosine on that benchmark's split (the test split not looked at); 1e-3 for the other
    heads, where the spinal head at 2e-3 fell far below its val mAP at 1e-3 on the same benchmark."""
    import yaml

    return {
        "name": name,
        "data": {**source, "augment": "auto"},
        "model": {"backbone": backbone, "pretrained": yaml.safe_load(pretrained), "head": head},
        "optimizer": {"name": "adamw", "weight_decay": 0.05},
        "schedule": {"name": "constant"},
        "stages": [{"name": "all", "epochs": 12, "train": "all", "batchnorm": "train",
                    "optimizer": {"lr": 2e-3 if head == "linear" else 1e-3}}],
        "training": {"mixup": "auto"},
    }


def staged_defaults(source: dict, name: str, backbone: str, head: str, pretrained: str) -> dict:
    """The staged defaults of single-label data (``DEFAULT_STAGES_HELP``)."""
    import yaml

    return {
        "name": name,
        "data": {**source, "augment": "auto"},
        "model": {"backbone": backbone, "pretrained": yaml.safe_load(pretrained), "head": head},
        "optimizer": {"name": "adamw", "weight_decay": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "stages": [
            # the head learns on augmented features (one cached view of the train transform), so the images
            # of the next stage look like what it was trained on
            {"name": "head", "epochs": 3, "train": "head", "optimizer": {"lr": 1e-3}, "feature_cache_views": 1},
            # then linear probe -> fine-tune: everything at once (a 'top' stage of the last 2 backbone stages in
            # between reached a lower validation accuracy in the same time, bench_recipes.py). BatchNorm keeps
            # its pretrained statistics (batches of 32 augmented images far from ImageNet would replace them
            # within an epoch, and the head would see other features than it learned on); the EMA below
            # carries the stage's start over its first, noisy updates
            {"name": "all", "epochs": 7, "train": "all", "optimizer": {"lr": 1e-3, "layer_decay": 0.8},
             "batchnorm": "eval"},
        ],
        # mixup auto (with data.augment): by input size, data/transforms.py size_defaults. Validate, select and
        # export the EMA of the weights, its decay warmed up so a small data set's few updates are averaged too
        "training": {"mixup": "auto", "ema": 0.999, "ema_warmup": True},
    }


def run(args) -> int:
    from finetune.config import apply_override, parse_recipe
    from finetune.errors import FinetuneError
    from finetune.training import train

    if args.resume:
        if args.recipe or args.overrides or args.data or args.backbone or args.labels:
            raise FinetuneError("--resume continues a run with its saved recipe; give no recipe, --set, --data or --backbone")
        if not (Path(args.resume) / "recipe.yaml").is_file():
            from finetune.training.run_folder import restartable_hint

            raise FinetuneError(f"nothing to resume in {args.resume}: no recipe.yaml (not a run folder, or a run "
                                f"killed during its setup); {restartable_hint(Path(args.resume))}")
        train(None, resume=args.resume, quiet=args.quiet)
        return 0
    if args.recipe:
        if args.data or args.backbone or args.labels:
            raise FinetuneError("give either a recipe or --data/--backbone/--labels (override recipe values with "
                                "--set, e.g. --set data.manifest=labels.csv)")
        train(args.recipe, overrides=args.overrides, out=args.out, quiet=args.quiet)
        return 0
    if args.labels and not args.data:
        raise FinetuneError("--labels names the labels of the images under --data ROOT: give --data too")
    if args.labels and not Path(args.labels).is_file():
        raise FinetuneError(f"--labels {args.labels}: no such file")
    if args.data and args.backbone:
        raw = default_recipe(args.data, args.backbone, args.head, args.pretrained, args.labels)
        for assignment in args.overrides:
            apply_override(raw, assignment)
        recipe = parse_recipe(raw, source="default recipe")
        raw = recipe.model_dump(mode="json")
    else:
        raise FinetuneError("give a recipe file, or --data ROOT and --backbone NAME (or --resume RUN_DIR)")
    from finetune.training.runner import run_training  # imports torch: after the arguments are checked

    run_dir = Path(args.out or recipe.output.dir.format(name=recipe.name))
    run_training(recipe, raw, run_dir=run_dir, quiet=args.quiet)
    return 0
