"""Spinal vs linear head accuracy on the digits sample under the same recipe and budget, over seeds.

    python benchmarks/bench_head_accuracy.py          # 3 seeds, tf_efficientnet_lite0 offline, 64 px
    python benchmarks/bench_head_accuracy.py --seeds 0 1 2 3 4 --train-per-class 10   # few-shot: 10 per class
    python benchmarks/bench_head_accuracy.py --tiny   # seconds; the smoke test

The recipe is the quickstart's (data, model, optimizer and training sections of
``recipes/quickstart.yaml``) with a shorter schedule: a head stage from cached features
(``--head-epochs`` epochs over ``--views`` augmented views), then ``last:2`` for ``--top-epochs`` epochs
with BatchNorm in eval mode. Only the head differs: the quickstart's spinal head (4 layers of 256, 2
splits, dropout 0.2) or a linear head with the same dropout. Each seed (``training.seed``: initial head
weights, augmentation, batch order) trains both heads on the same split (``data.seed`` 0) and the same
cached features; the order alternates between seeds. Reported: test accuracy per run, mean and sample
standard deviation per head, and the per-seed difference spinal - linear. With ``--train-per-class N``
(``data.train_per_class``: N training images per class, val as before, every other image the test
split) the result is
``head_accuracy_fewshot``, its own section.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

import _common

HEADS = {
    "spinal": {"name": "spinal", "width": 256, "layers": 4, "splits": 2, "dropout": 0.2},
    "linear": {"name": "linear", "dropout": 0.2},
}


def make_recipe(digits: Path, *, head: dict, seed: int, cache_dir: Path, head_epochs: int, views: int,
                top_epochs: int, tiny: bool, train_per_class: Optional[int] = None) -> dict[str, Any]:
    raw = yaml.safe_load((_common.REPO_ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["name"] = "head-accuracy"
    raw["data"]["root"] = str(digits)
    raw["data"].pop("sample", None)
    raw["model"]["head"] = dict(head)
    if train_per_class:  # what is left after train and val is the test split (finetune's few-shot protocol)
        raw["data"]["train_per_class"] = train_per_class
        raw["data"].pop("test", None)
    if tiny:
        _common.tiny_recipe(raw)
    raw["stages"] = [
        {"name": "head", "epochs": head_epochs, "train": "head", "optimizer": {"lr": 3e-3},
         "feature_cache": True, "feature_cache_views": views},
        {"name": "top", "epochs": top_epochs, "train": "last:2", "optimizer": {"lr": 3e-4},
         "schedule": {"warmup_epochs": 0.5}, "batchnorm": "eval"},
    ]
    raw["training"].update(seed=seed, device="cpu", cache_dir=str(cache_dir))
    raw["output"] = {"evaluate_test": True}
    return raw


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--head-epochs", type=int, default=6)
    p.add_argument("--views", type=int, default=2, help="augmented views cached for the head stage")
    p.add_argument("--top-epochs", type=int, default=2)
    p.add_argument("--train-per-class", type=int, help="few-shot: this many training images per class "
                                                        "(val as before, the rest is the test split)")
    p.add_argument("--digits", type=Path, help="an existing digits folder (default: written to a temp dir)")
    args = p.parse_args(argv)
    if args.tiny:
        args.seeds, args.head_epochs, args.views, args.top_epochs = [0, 1], 1, 1, 1
    from finetune.config import parse_recipe
    from finetune.training.runner import run_training

    wall = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in HEADS}
    with tempfile.TemporaryDirectory(prefix="bench-headacc-") as tmp:
        work = Path(tmp)
        digits = _common.digits_folder(work, per_class=12 if args.tiny else None, source=args.digits)
        for i, seed in enumerate(args.seeds):
            for name in HEADS if i % 2 == 0 else reversed(list(HEADS)):
                raw = make_recipe(digits, head=HEADS[name], seed=seed, cache_dir=work / f"cache-{seed}",
                                  head_epochs=args.head_epochs, views=args.views, top_epochs=args.top_epochs,
                                  tiny=args.tiny, train_per_class=args.train_per_class)
                with _common.Stopwatch() as t:
                    summary = run_training(parse_recipe(raw), raw, run_dir=work / f"{name}-{seed}", quiet=True)
                runs[name].append({"seed": seed, "test_accuracy": summary["test"]["accuracy"],
                                   "test_images": summary["test"]["num_samples"],
                                   "test_macro_f1": summary["test"]["macro_f1"],
                                   "best_val_accuracy": summary["best_val"]["accuracy"],
                                   "train_seconds": summary["train_seconds"], "wall_s": t.seconds})
    wall = time.perf_counter() - wall

    stats = {name: {"test_accuracy": _common.mean_std([r["test_accuracy"] for r in rs]),
                    "best_val_accuracy": _common.mean_std([r["best_val_accuracy"] for r in rs]),
                    "train_seconds": _common.mean_std([r["train_seconds"] for r in rs])}
             for name, rs in runs.items()}
    diffs = [s["test_accuracy"] - l["test_accuracy"] for s, l in zip(runs["spinal"], runs["linear"])]
    diff = _common.mean_std(diffs)
    sp, li = stats["spinal"]["test_accuracy"], stats["linear"]["test_accuracy"]
    wins = sum(d > 0 for d in diffs)
    test_images = runs["spinal"][0]["test_images"]
    data = (f"{args.train_per_class} training images per class" if args.train_per_class
            else "the full training split")
    summary = [
        f"Digits, {data}: test accuracy over {len(args.seeds)} seeds: spinal {sp['mean']:.4f} ± {sp['std']:.4f}, "
        f"linear {li['mean']:.4f} ± {li['std']:.4f} (mean ± sample std).",
        f"Per-seed difference spinal - linear: {diff['mean'] * 100:+.2f} ± {diff['std'] * 100:.2f} points "
        f"({', '.join(f'{d * 100:+.2f}' for d in diffs)}); spinal ahead on {wins} of {len(diffs)} seeds.",
    ]
    rows = [[f"seed {s['seed']}", s["test_accuracy"], l["test_accuracy"],
             (s["test_accuracy"] - l["test_accuracy"]) * 100, s["best_val_accuracy"], l["best_val_accuracy"]]
            for s, l in zip(runs["spinal"], runs["linear"])]
    rows.append(["mean ± std", f"{sp['mean']:.4f} ± {sp['std']:.4f}", f"{li['mean']:.4f} ± {li['std']:.4f}",
                 f"{diff['mean'] * 100:+.2f} ± {diff['std'] * 100:.2f}",
                 f"{stats['spinal']['best_val_accuracy']['mean']:.4f}",
                 f"{stats['linear']['best_val_accuracy']['mean']:.4f}"])
    tables = [_common.table(
        f"Head stage {args.head_epochs} epochs over {args.views} cached view(s), then last:2 for {args.top_epochs} "
        f"epochs; {data}; test split of {test_images} images.",
        ["seed", "spinal test acc", "linear test acc", "spinal - linear (points)", "spinal best val",
         "linear best val"], rows)]
    notes = [f"Heads: spinal {HEADS['spinal']}, linear {HEADS['linear']}; everything else identical. "
             f"With {test_images} test images one image is {100 / test_images:.2f} points."]
    name, title = "head_accuracy", "Head accuracy: spinal vs linear on digits"
    if args.train_per_class:
        name, title = "head_accuracy_fewshot", f"{title}, {args.train_per_class} training images per class"
    _common.write_result(
        args.out, name, title=title,
        command=_common.command_line("bench_head_accuracy.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"seeds": args.seeds, "head_epochs": args.head_epochs, "views": args.views,
                  "top_epochs": args.top_epochs, "heads": HEADS, "tiny": args.tiny,
                  "train_per_class": args.train_per_class},
        summary=summary, tables=tables, notes=notes,
        results={"stats": stats, "difference": diff, "runs": runs},
    )
    return {"stats": stats, "difference": diff}


if __name__ == "__main__":
    main()
