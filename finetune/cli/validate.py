"""`finetune validate RECIPE [--set KEY=VALUE ...]`: check a recipe without training."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a recipe (schema, backbone, head, stages) without training")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value before checking")
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved recipe")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from finetune.config import load_recipe

    recipe, raw = load_recipe(args.recipe, args.overrides)
    if args.show:
        print(yaml.safe_dump(raw, sort_keys=False), end="")
    stages = ", ".join(f"{s.name or i}: {s.epochs} ep {s.train}" for i, s in enumerate(recipe.stages))
    print(f"{args.recipe}: OK — {recipe.model.backbone} + {recipe.model.head if isinstance(recipe.model.head, str) else recipe.model.head['name']} head; stages {stages}")
    return 0
