"""Recipes measured: stage transitions, the no-recipe defaults against a plain loop, and the three heads.

    python benchmarks/bench_recipes.py                          # digits at 64 px, seeds 0 1 2: every part
    python benchmarks/bench_recipes.py --parts transitions      # one part (transitions, fewshot, full)
    python benchmarks/bench_recipes.py --tiny                   # test_resnet at 32 px, 1 seed, spinal only: smoke test

Data: the digits sample (8x8 scans as 32 px PNGs) at ``data.input_size: 64``, split 70/15/15 with seed 0 (the
same val and test images in every arm); ``fewshot`` keeps 10 training images per class
(``data.train_per_class: 10``). Seeds vary ``training.seed`` (initialisation of the head, shuffling,
augmentation, dropout).

Parts:

- ``transitions``: the no-recipe defaults (``finetune train --data ... --backbone tf_efficientnet_lite0
  --pretrained offline --set data.input_size=64``) and ``recipes/quickstart.yaml``, per epoch. The goal
  (issue 12): for every stage after the first, validation accuracy after its first epoch is at most
  0.5 points below the end of the previous stage, and the stage ends at or above the previous one.
- ``full`` and ``fewshot``: the defaults (spinal head) against the plain loop of benchmarks/bench_step.py (every
  parameter trained from the start at one lr with ``torch.optim.AdamW``, cross-entropy, the same backbone,
  pretrained weights, head and default transforms) given at least the defaults' wall time of the same seed:
  it trains whole epochs until its time is up and keeps its best epoch by validation accuracy, as the
  runner keeps ``checkpoints/best``. ``fewshot`` also runs the linear and mlp heads under the defaults.
  ``full`` reuses the defaults' runs of ``transitions`` when both parts run.

Accuracies are test accuracies of the best checkpoint (by validation accuracy); the defaults were tuned on
validation figures only.
"""
from __future__ import annotations

import copy
import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import _common

BACKBONE = "tf_efficientnet_lite0"
SIZE = 64
MAX_FIRST_EPOCH_DROP = 0.005
PLAIN_LR = 1e-3  # bench_step.py's plain loop
PARTS = ("transitions", "full", "fewshot")


def defaults_recipe(root: Path, *, head: str = "spinal", tiny: bool) -> dict[str, Any]:
    from finetune.cli.train import default_recipe

    raw = default_recipe(str(root), "test_resnet" if tiny else BACKBONE, head, "false" if tiny else "offline")
    raw["data"]["input_size"] = 32 if tiny else SIZE
    return raw


def quickstart_recipe(root: Path, *, tiny: bool) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load((_common.REPO_ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["data"]["root"] = str(root)
    raw["data"].pop("sample", None)  # root holds the digits already (a subset of them when tiny)
    return _common.tiny_recipe(raw) if tiny else raw


def run_recipe(raw: dict[str, Any], run_dir: Path, *, seed: int, cache: Path, tiny: bool,
               train_per_class: Optional[int] = None) -> dict[str, Any]:
    """Train a raw recipe in-process; its per-epoch rows, wall time and test accuracy."""
    from finetune.config import parse_recipe
    from finetune.training.runner import run_training

    raw = copy.deepcopy(raw)
    raw["data"].update(num_workers=0, train_per_class=train_per_class)
    raw["training"] = {**raw.get("training", {}), "seed": seed, "cache_dir": str(cache)}
    raw["evaluation"] = {**raw.get("evaluation", {}), "calibrate": False}
    if tiny:
        for stage in raw["stages"]:
            stage["epochs"] = 1
    recipe = parse_recipe(raw, source="bench_recipes")
    start = time.perf_counter()
    summary = run_training(recipe, recipe.model_dump(mode="json"), run_dir=run_dir, quiet=True)
    wall = time.perf_counter() - start
    with open(run_dir / "metrics.csv") as f:
        rows = [{"stage": int(r["stage"]), "train_acc": float(r["train_acc"]), "val_acc": float(r["val_acc"])}
                for r in csv.DictReader(f)]
    return {"seed": seed, "wall_s": wall, "test_accuracy": summary["test"]["accuracy"],
            "best_val_accuracy": summary["best_val"]["accuracy"], "epochs": rows}


def transitions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage after the first: the previous stage's last val acc, this stage's first and last, and the checks."""
    stages: dict[int, list[float]] = {}
    for row in rows:
        stages.setdefault(row["stage"], []).append(row["val_acc"])
    order = sorted(stages)
    out = []
    for prev, cur in zip(order, order[1:]):
        before, first, end = stages[prev][-1], stages[cur][0], stages[cur][-1]
        out.append({"stage": cur, "previous_end": before, "first_epoch": first, "end": end,
                    "first_epoch_change": first - before,
                    "first_ok": first >= before - MAX_FIRST_EPOCH_DROP - 1e-9, "end_ok": end >= before - 1e-9})
    return out


def plain_loop(run_dir: Path, *, seed: int, budget_s: float, lr: float, tiny: bool) -> dict[str, Any]:
    """bench_step.py's plain loop on the split of the finetune run in ``run_dir``, for at least ``budget_s``."""
    import torch
    import yaml
    from torch import nn

    from finetune.data import ImageDataset, Manifest, preprocessing_transform
    from finetune.models.factory import resolve_preprocessing
    from finetune.models import create_model

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    manifest = Manifest.read_csv(run_dir / "manifest.csv", root=recipe["data"]["root"])
    torch.manual_seed(seed)
    model = create_model(recipe["model"]["backbone"], len(manifest.classes), head=recipe["model"]["head"],
                         pretrained=recipe["model"]["pretrained"])
    pre = resolve_preprocessing(model.data_config(), input_size=recipe["data"]["input_size"])
    batch = recipe["training"]["batch_size"]
    train_set = ImageDataset(manifest.items("train"), preprocessing_transform(pre, train=True), seed=seed)
    loaders = {split: torch.utils.data.DataLoader(ImageDataset(manifest.items(split), preprocessing_transform(pre)),
                                                  batch_size=2 * batch)
               for split in ("val", "test")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    def accuracy(loader) -> float:
        model.eval()
        correct = total = 0
        with torch.inference_mode():
            for x, y, *_ in loader:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        return correct / total

    start, epoch, best, history = time.perf_counter(), 0, (-1.0, None), []
    while time.perf_counter() - start < budget_s or epoch == 0:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        model.train()
        for x, y, *_ in torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, generator=generator):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        val = accuracy(loaders["val"])
        history.append(val)
        if val > best[0]:
            best = (val, copy.deepcopy(model.state_dict()))
        epoch += 1
        if tiny:
            break
    wall = time.perf_counter() - start
    model.load_state_dict(best[1])
    return {"seed": seed, "wall_s": wall, "epochs_trained": epoch, "val_history": history, "best_val_accuracy": best[0],
            "test_accuracy": accuracy(loaders["test"])}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", choices=("defaults", "quickstart"), default=["defaults", "quickstart"],
                   help="the recipes the transitions part runs")
    p.add_argument("--plain-lr", type=float, default=PLAIN_LR, help="the plain loop's AdamW lr")
    p.add_argument("--digits", type=Path, help="an existing digits folder (default: written to a temp folder)")
    p.add_argument("--records", type=Path,
                   help="keep each run's figures here as ARM-SEED.json and report every record found: runs "
                        "already recorded are skipped, and processes given other --seeds can share the folder")
    p.add_argument("--report", action="store_true", help="run nothing: report the runs recorded in --records")
    args = p.parse_args(argv)
    args.argv = argv
    if args.tiny:
        args.seeds = args.seeds[:1]
    start = time.perf_counter()
    arms: dict[str, dict[int, dict[str, Any]]] = {}
    if args.report and not args.records:
        p.error("--report needs --records")
    if args.records:
        args.records.mkdir(parents=True, exist_ok=True)

    def record(arm: str, seed: int, make) -> dict[str, Any]:
        path = args.records / f"{arm.replace(' ', '_')}-{seed}.json" if args.records else None
        if path is not None and path.is_file():
            out = json.loads(path.read_text())
        else:
            out = {**make(), "code": _common.START_CODE}  # a folder may gather runs of several commits
            if path is not None:
                path.write_text(json.dumps(out))
        arms.setdefault(arm, {})[seed] = out
        report(args, arms, time.perf_counter() - start)
        return out

    if args.report:  # every record in the folder, under its file's arm name (underscores read as spaces)
        for path in sorted(args.records.glob("*-*.json")):
            arm, seed = path.stem.rsplit("-", 1)
            arms.setdefault(arm.replace("_", " "), {})[int(seed)] = json.loads(path.read_text())
        return report(args, arms, time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        work = Path(tmp)
        root = _common.digits_folder(work, per_class=8 if args.tiny else None, source=args.digits)
        cache = work / "cache"

        def run(arm: str, raw: dict[str, Any], seed: int, **kw) -> dict[str, Any]:
            out = run_recipe(raw, work / f"{arm}-{seed}".replace(" ", "_"), seed=seed, cache=cache, tiny=args.tiny,
                             **kw)
            print(f"{arm} seed {seed}: test {out['test_accuracy']:.4f}, {out['wall_s']:.0f} s, val per epoch "
                  + " ".join(f"{r['stage']}:{r['val_acc']:.3f}" for r in out["epochs"]), flush=True)
            return out

        def plain(reference: str, raw: dict[str, Any], seed: int, **kw) -> dict[str, Any]:
            """The plain loop on the split of the reference arm's run (made again if it was recorded earlier)."""
            run_dir = work / f"{reference}-{seed}".replace(" ", "_")
            if not (run_dir / "manifest.csv").is_file():
                raw = {**raw, "stages": [{**raw["stages"][0], "epochs": 1}]}
                run_recipe(raw, run_dir, seed=seed, cache=cache, tiny=True, **kw)  # only for its split
            out = plain_loop(run_dir, seed=seed, budget_s=arms[reference][seed]["wall_s"], lr=args.plain_lr,
                             tiny=args.tiny)
            print(f"plain loop beside {reference} seed {seed}: test {out['test_accuracy']:.4f}, {out['wall_s']:.0f} s "
                  f"({out['epochs_trained']} epochs)", flush=True)
            return out

        for seed in args.seeds:
            raw = defaults_recipe(root, tiny=args.tiny)
            if "full" in args.parts or ("transitions" in args.parts and "defaults" in args.recipes):
                record("defaults", seed, lambda: run("defaults", raw, seed))
            if "transitions" in args.parts and "quickstart" in args.recipes:
                record("quickstart", seed, lambda: run("quickstart", quickstart_recipe(root, tiny=args.tiny), seed))
            if "full" in args.parts and "defaults" in arms and seed in arms["defaults"]:
                record("plain", seed, lambda: plain("defaults", raw, seed))
            if "fewshot" in args.parts:
                per_class = 2 if args.tiny else 10
                for head in ("spinal",) if args.tiny else ("spinal", "linear", "mlp"):
                    head_raw = defaults_recipe(root, head=head, tiny=args.tiny)
                    record(f"fewshot {head}", seed,
                           lambda: run(f"fewshot {head}", head_raw, seed, train_per_class=per_class))
                raw = defaults_recipe(root, tiny=args.tiny)
                if seed in arms.get("fewshot spinal", {}):
                    record("fewshot plain", seed,
                           lambda: plain("fewshot spinal", raw, seed, train_per_class=per_class))
    return report(args, arms, time.perf_counter() - start)


def report(args, arms: dict[str, dict[int, dict[str, Any]]], wall: float) -> dict[str, Any]:
    """Write the results of the runs so far (``arms``: arm -> seed -> run) and RESULTS.md."""
    results: dict[str, Any] = {"transitions": {}, "full": {}, "fewshot": {}}
    tables, summary = [], []
    shown = [arm for arm in arms if arm.startswith(("defaults", "quickstart")) and "transitions" in args.parts]
    if shown:
        rows, verdicts = [], []
        for arm in shown:
            checks = []
            for seed, run_ in sorted(arms[arm].items()):
                for t in transitions(run_["epochs"]):
                    checks.append(t)
                    rows.append([arm, seed, t["stage"], t["previous_end"], t["first_epoch"], t["end"],
                                 100 * t["first_epoch_change"], "yes" if t["first_ok"] and t["end_ok"] else "NO"])
            results["transitions"][arm] = {str(s): {**r, "transitions": transitions(r["epochs"])}
                                           for s, r in sorted(arms[arm].items())}
            held = sum(t["first_ok"] and t["end_ok"] for t in checks)
            worst = min(t["first_epoch_change"] for t in checks)
            verdicts.append(f"{arm} (seeds {', '.join(map(str, sorted(arms[arm])))}): {held}/{len(checks)} "
                            f"transitions meet the goal (worst first-epoch change {100 * worst:+.1f} points)")
        summary.append("Stage transitions: " + "; ".join(verdicts) + ". Goal: first epoch of a stage >= the previous "
                       "stage's end - 0.5 points, and the stage's end >= the previous stage's end.")
        tables.append(_common.table(
            "Validation accuracy at each stage transition, per seed (val split: 269 images, one image = 0.37 points).",
            ["recipe", "seed", "stage", "previous stage's end", "first epoch", "stage end", "first-epoch change (pt)",
             "goal met"], rows))
    compare = [arm for arm in ("defaults", "plain", "fewshot spinal", "fewshot linear", "fewshot mlp", "fewshot plain")
               if arm in arms and (arm != "defaults" or "full" in args.parts)]
    if compare:
        rows = []
        for arm in compare:
            runs = [r for _, r in sorted(arms[arm].items())]
            test, val = (_common.mean_std([r[k] for r in runs]) for k in ("test_accuracy", "best_val_accuracy"))
            secs = _common.mean_std([r["wall_s"] for r in runs])
            rows.append([arm, len(runs), test["mean"], test["std"], val["mean"], secs["mean"],
                         " ".join(f"{r['test_accuracy']:.4f}" for r in runs)])
            results["fewshot" if arm.startswith("fewshot") else "full"][arm] = {
                "test_accuracy": test, "best_val_accuracy": val, "wall_s": secs,
                "runs": [{"seed": s, **{k: v for k, v in r.items() if k != "epochs"}}
                         for s, r in sorted(arms[arm].items())]}
        tables.append(_common.table(
            "Test accuracy (best checkpoint by val accuracy), mean and std over seeds; the plain loop gets at least "
            "the wall time of the defaults' run of the same seed.",
            ["arm", "seeds", "test acc", "std", "best val acc", "wall s", "test acc per seed"], rows))
        for data, ours, theirs in (("full digits", "defaults", "plain"),
                                   ("10 images/class", "fewshot spinal", "fewshot plain")):
            seeds = sorted(set(arms.get(ours, {})) & set(arms.get(theirs, {})))
            if ours in compare and theirs in compare and seeds:  # on the seeds both ran
                a = _common.mean_std([arms[ours][s]["test_accuracy"] for s in seeds])["mean"]
                b = _common.mean_std([arms[theirs][s]["test_accuracy"] for s in seeds])["mean"]
                summary.append(f"{data}, seeds {', '.join(map(str, seeds))}: defaults {a:.4f} vs plain loop {b:.4f} "
                               f"test accuracy ({'beat' if a > b else 'do NOT beat'} it, {100 * (a - b):+.1f} points).")
        heads = {h: arms[f"fewshot {h}"] for h in ("spinal", "linear", "mlp") if f"fewshot {h}" in arms}
        if len(heads) > 1:
            summary.append("10 images/class, heads under the defaults (test accuracy, mean over seeds): " + ", ".join(
                f"{h} {_common.mean_std([r['test_accuracy'] for r in runs.values()])['mean']:.4f} "
                f"(seeds {', '.join(map(str, sorted(runs)))})" for h, runs in heads.items()) + ".")
    commits: dict[str, list[str]] = {}
    for arm, runs in arms.items():
        for seed, run_ in sorted(runs.items()):
            commits.setdefault(_commit_label(run_.get("code") or {}), []).append(f"{arm} {seed}")
    if len(commits) > 1 or (commits and next(iter(commits)) != _commit_label(_common.START_CODE)):
        summary.append("Runs measured on other commits than this report's: " + "; ".join(
            f"{commit}: {', '.join(runs)}" for commit, runs in commits.items()) + ".")
    results["commits"] = commits
    results["settings"] = {"seeds": args.seeds, "parts": args.parts, "plain_lr": args.plain_lr,
                           "backbone": "test_resnet" if args.tiny else BACKBONE, "input_size": 32 if args.tiny else SIZE}
    _common.write_result(
        args.out, "recipes", title="Recipes: stage transitions, defaults vs a plain loop, heads",
        command=_common.command_line("bench_recipes.py", argv=None if args.argv is None else args.argv),
        tiny=args.tiny, wall_s=wall, settings=results["settings"], summary=summary or ["Runs so far in the table below; no comparison complete yet."],
        tables=tables or [_common.table("Runs", ["arm"], [["none yet"]])], results=results,
        notes=["With --records each run is kept as ARM-SEED.json, and --report gathers every record of the folder, "
               "which may come from several processes (one per seed) and from recipes since changed: an arm named "
               "'... (not shipped)' is a variant measured and not adopted.",
               "Runs in-process with data.num_workers: 0 and calibration off; wall times depend on the machine's "
               "load (a shared 2-core CPU): the plain loop's budget is the defaults' wall time of the same seed, "
               "measured just before it."],
    )
    return results


def _commit_label(code: dict[str, Any]) -> str:
    return (code.get("commit") or "not recorded") + ("+uncommitted" if code.get("dirty") else "")


if __name__ == "__main__":
    main()
