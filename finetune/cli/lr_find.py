"""`finetune lr-find RECIPE --stage N`: sweep a stage's learning rate and suggest one."""
from __future__ import annotations

from pathlib import Path

from finetune.cli import whole_number


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lr-find", help="sweep a stage's learning rate (fastai's LR finder) and suggest one",
        description="Train one stage of a recipe for up to --updates updates while the learning rate grows "
                    "exponentially from 1e-7 to 10, stop when the smoothed loss exceeds 4x its minimum, and write "
                    "lr_find.png (loss against lr) and lr_find.json (the curve, suggested_lr: the steepest descent "
                    "of the smoothed loss, and min_loss_lr) into --out. Head-only stages sweep on cached features. "
                    "No run folder is written.",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--stage", type=int, default=0, metavar="N", help="the stage's index, from 0 (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, as for finetune train (repeatable)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: lr-find-RECIPE_NAME-stageN)")
    p.add_argument("--updates", type=whole_number(2), default=100,
                   help="updates in the sweep, 2 or more (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="the first learning rate (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="the last learning rate (default 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune.config import load_recipe

    recipe, resolved = load_recipe(args.recipe, args.overrides)
    from finetune.training.lr_find import lr_find  # imports torch: after the recipe is checked

    out = Path(args.out or f"lr-find-{recipe.name}-stage{args.stage}")
    result = lr_find(recipe, resolved, stage=args.stage, out_dir=out, start_lr=args.start_lr, end_lr=args.end_lr,
                     num_updates=args.updates)
    print(f"stage {result['stage']} ({result['stage_name']}): suggested lr {result['suggested_lr']:.3g} (steepest "
          f"descent), minimum loss at {result['min_loss_lr']:.3g}; {result['num_updates']} updates, "
          f"{result['stopped']}{', on cached features' if result['cached_features'] else ''}")
    print(f"wrote {out}/lr_find.png and lr_find.json")
    return 0
