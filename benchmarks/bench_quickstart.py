"""The quickstart end to end: wall time and test accuracy (target: < 180 s and >= 98% on a 2-core CPU).

    python benchmarks/bench_quickstart.py          # the shipped recipes/quickstart.yaml, as a user runs it
    python benchmarks/bench_quickstart.py --tiny   # test_resnet, 1 epoch per stage; the smoke test
    python benchmarks/bench_quickstart.py --compare ../old --rounds 2   # A/B against another checkout

Runs ``python -m finetune train recipes/quickstart.yaml --out run --quiet`` as a subprocess in a fresh
temporary working folder (so the recipe's ``data/digits`` is written there) with an empty feature cache
(``FINETUNE_CACHE``) and an empty scan cache, i.e. a cold first run. Wall time covers everything the user
waits for: start-up, writing the digits, the scan, three stages, the test evaluation. The child's CPU time
shows how much of the machine it got: on a loaded machine the wall time grows while the CPU time stays.

The run's log lines are time-stamped as they arrive, which splits the wall time into phases: start-up
and setup (imports, digits, scan, manifest, model), each stage (the one-time feature extraction, the
training passes from metrics.csv, and the rest: validation, checkpoints, logs, loader start-up), and the
finish (calibration, test evaluation, report).

``--compare PATH`` runs the same quickstart with ``PYTHONPATH=PATH`` (another checkout of finetune, e.g.
a ``git worktree`` of an older commit, with its own ``recipes/quickstart.yaml``) and this checkout in
turns (A B, B A, ...) for ``--rounds`` rounds, and reports each phase's median per side and the per-round
ratios: "did anything get slower" on a shared machine, where only side-by-side ratios mean something.
"""
from __future__ import annotations

import csv
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import _common

TARGET_S = 180.0
TARGET_ACC = 0.98
TINY_SETS = (*_common.TINY_SETS, "stages.0.epochs=1", "stages.0.feature_cache_views=1", "stages.1.epochs=1",
             "stages.2.epochs=1")
STAGE_LINE = re.compile(r"^stage (\d+) \(")
EPOCH_LINE = re.compile(r"^stage (\d+) \([^)]*\), epoch \d+: train loss")
EXTRACTION_LINE = re.compile(r"cached backbone features in ([\d.]+)s")
STAGE_NAMES = {"0": "head (cached)", "1": "top (last:3)", "2": "all"}


def run_quickstart(checkout: Path, overrides: Sequence[str], threads: Optional[int]) -> dict[str, Any]:
    """One cold quickstart run of the finetune in ``checkout`` (its recipe, its code): wall and CPU
    seconds, test metrics, per-stage figures and the phases of the wall time."""
    recipe = checkout / "recipes" / "quickstart.yaml"
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "finetune", "train", str(recipe), "--out", "run", "--quiet"]
        for assignment in overrides:
            cmd += ["--set", assignment]
        # the run's working folder is first on sys.path (python -m), then the checkout under test
        env = {**os.environ, "FINETUNE_CACHE": str(work / "cache"), "PYTHONPATH": str(checkout)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        lines: list[tuple[float, str]] = []
        load_before = _common.load_average()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        with open(work / "stdout.txt", "w") as stdout:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)

            def read() -> None:
                for line in proc.stderr:
                    lines.append((time.perf_counter() - start, line.rstrip("\n")))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            returncode = proc.wait()
            reader.join()
        wall = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if returncode != 0:
            sys.stderr.write("\n".join(line for _, line in lines) + "\n")
            raise SystemExit(f"finetune train ({checkout}) failed with exit status {returncode}")
        summary_json = json.loads((work / "run" / "summary.json").read_text())
        with open(work / "run" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    extraction = next((float(m.group(1)) for _, line in lines if (m := EXTRACTION_LINE.search(line))), None)

    stages: dict[str, dict[str, float]] = {}
    for row in rows:
        st = stages.setdefault(row["stage"], {"epochs": 0, "train_pass_s": 0.0, "last_val_acc": 0.0})
        st["epochs"] += 1
        st["train_pass_s"] += float(row["seconds"])
        st["last_val_acc"] = float(row["val_acc"])
    test = summary_json["test"]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "cores_used": cpu / wall,
        "load_average_before": load_before,
        "load_average_after": _common.load_average(),
        "train_seconds": summary_json["train_seconds"],
        "feature_extraction_s": extraction,
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_samples": test["num_samples"],
        "best_epoch": summary_json["best_epoch"],
        "best_val_accuracy": summary_json["best_val"]["accuracy"],
        "stages": stages,
        "phases": phases(lines, stages, extraction, wall),
        "epochs": [{k: row[k] for k in ("stage", "epoch", "train_acc", "val_acc", "val_loss", "seconds")}
                   for row in rows],
    }


def phases(lines: list[tuple[float, str]], stages: dict[str, dict[str, float]], extraction: Optional[float],
           wall: float) -> dict[str, float]:
    """Split the wall time at the log lines' arrival: start-up and setup until the first stage's line;
    each stage until the next one's line (the last one until its last epoch line); the finish after it
    (the last checkpoint, calibration, test evaluation, report). A stage's ``other`` is its span less its
    training passes and feature extraction: validation, checkpoints, logs, DataLoader start-up."""
    starts = {m.group(1): t for t, line in lines if (m := STAGE_LINE.match(line)) and not EPOCH_LINE.match(line)}
    epoch_ends = [(m.group(1), t) for t, line in lines if (m := EPOCH_LINE.match(line))]
    if not starts or not epoch_ends:
        return {"whole run": wall}
    order = sorted(starts, key=starts.get)
    out = {"start-up and setup": starts[order[0]]}
    for i, stage in enumerate(order):
        end = starts[order[i + 1]] if i + 1 < len(order) else epoch_ends[-1][1]
        span = end - starts[stage]
        train = stages.get(stage, {}).get("train_pass_s", 0.0)
        extract = (extraction or 0.0) if i == 0 else 0.0
        name = STAGE_NAMES.get(stage, f"stage {stage}")
        out[f"{name}: whole stage"] = span
        out[f"{name}: training passes"] = train
        if extract:
            out[f"{name}: feature extraction"] = extract
        out[f"{name}: validation, checkpoints, logs"] = span - train - extract
    out["finish (calibration, test evaluation, report)"] = wall - epoch_ends[-1][1]
    out["whole run"] = wall
    return out


def single(args, overrides: list[str], argv: Optional[Sequence[str]]) -> dict[str, Any]:
    results = run_quickstart(_common.REPO_ROOT, overrides, args.threads)
    results["targets"] = {"wall_s": TARGET_S, "test_accuracy": TARGET_ACC}
    wall, cpu, test_acc = results["wall_s"], results["cpu_s"], results["test_accuracy"]
    ok_time, ok_acc = wall < TARGET_S, test_acc >= TARGET_ACC
    summary = [
        f"Wall time {wall:.0f} s ({'meets' if ok_time else 'misses'} < {TARGET_S:.0f} s), test accuracy "
        f"{test_acc:.4f} on {results['test_samples']} images ({'meets' if ok_acc else 'misses'} >= {TARGET_ACC}); "
        f"macro-F1 {results['test_macro_f1']:.4f}.",
        f"The run used {cpu:.0f} s of CPU, {cpu / wall:.2f} cores on average; load average "
        f"{results['load_average_before']} before, {results['load_average_after']} after (other work shares the machine).",
    ]
    table_rows = [[name, f"{seconds:.2f}"] for name, seconds in results["phases"].items()]
    table_rows.append(["test accuracy", f"{test_acc:.4f}"])
    tables = [_common.table("Seconds of the wall time by phase (log lines time-stamped as they arrive; training "
                            "passes from metrics.csv).", ["phase", "seconds"], table_rows)]
    notes = ["A single cold run (empty feature cache, digits written on the way): the wall time depends on the "
             "machine's load at the time; cores_used says how much CPU the run actually got."]
    _common.write_result(
        args.out, "quickstart", title="Quickstart end to end",
        command=_common.command_line("bench_quickstart.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"command": "finetune train recipes/quickstart.yaml --out run --quiet", "overrides": overrides,
                  "threads": args.threads or "default", "tiny": args.tiny},
        summary=summary, tables=tables, notes=notes, results=results,
    )
    return results


def compare(args, overrides: list[str], argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """This checkout against ``args.compare`` in turns; per-phase medians and per-round ratios."""
    before_dir = args.compare.resolve()
    before_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=before_dir, capture_output=True,
                                   text=True).stdout.strip() or None
    sides = {"before": before_dir, "this checkout": _common.REPO_ROOT}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    started = time.perf_counter()
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(list(sides)))):  # A B, B A, ...
            runs[name].append(run_quickstart(sides[name], overrides, args.threads))
            print(f"  round {r + 1}/{args.rounds}, {name}: {runs[name][-1]['wall_s']:.1f} s wall, "
                  f"{runs[name][-1]['cpu_s']:.0f} s CPU", file=sys.stderr, flush=True)
    names = [p for p in runs["this checkout"][0]["phases"] if all(p in run["phases"] for run in runs["before"])]
    rows, stats = [], {}
    for phase in names:
        old = [run["phases"][phase] for run in runs["before"]]
        new = [run["phases"][phase] for run in runs["this checkout"]]
        ratios = _common.paired_ratios(new, old)
        stats[phase] = {"before_s": old, "after_s": new, "ratios": ratios, "median_ratio": _common.median(ratios)}
        rows.append([phase, f"{_common.median(old):.2f}", f"{_common.median(new):.2f}",
                     f"{_common.median(new) - _common.median(old):+.2f}", f"{_common.median(ratios):.2f}x",
                     ", ".join(f"{x:.2f}" for x in ratios)])
    for key, label in (("cpu_s", "CPU seconds (whole run)"), ("test_accuracy", "test accuracy")):
        old = [run[key] for run in runs["before"]]
        new = [run[key] for run in runs["this checkout"]]
        ratios = _common.paired_ratios(new, old)
        stats[label] = {"before_s": old, "after_s": new, "ratios": ratios, "median_ratio": _common.median(ratios)}
        fmt = "{:.4f}" if key == "test_accuracy" else "{:.1f}"
        rows.append([label, fmt.format(_common.median(old)), fmt.format(_common.median(new)),
                     ("{:+.4f}" if key == "test_accuracy" else "{:+.1f}").format(_common.median(new) - _common.median(old)),
                     f"{_common.median(ratios):.3f}x", ", ".join(f"{x:.3f}" for x in ratios)])
    whole = stats["whole run"]
    summary = [
        f"Quickstart, this checkout vs {before_dir.name}"
        f"{f' ({before_commit})' if before_commit else ''} in {args.rounds} interleaved round(s): whole run "
        f"{_common.median(whole['after_s']):.1f} s vs {_common.median(whole['before_s']):.1f} s, "
        f"{whole['median_ratio']:.3f}x (per round {', '.join(f'{x:.3f}' for x in whole['ratios'])}); CPU "
        f"{stats['CPU seconds (whole run)']['median_ratio']:.3f}x.",
    ]
    tables = [_common.table(
        f"Seconds per phase, medians of {args.rounds} cold run(s) per side run in turns (A B, B A, ...); ratio = "
        "median of per-round this/before (> 1: slower now).",
        ["phase", "before s", "now s", "difference s", "now / before", "per round"], rows)]
    notes = ["Each side runs its own recipes/quickstart.yaml with its own code (PYTHONPATH), both with the same "
             "Python environment; every run is cold (empty feature cache and scan cache, digits written anew)."]
    _common.write_result(
        args.out, "quickstart_compare", title="Quickstart: this checkout vs an earlier commit, side by side",
        command=_common.command_line("bench_quickstart.py", argv), tiny=args.tiny,
        wall_s=time.perf_counter() - started,
        settings={"before": str(before_dir), "before_commit": before_commit, "rounds": args.rounds,
                  "overrides": overrides, "threads": args.threads or "default"},
        summary=summary, tables=tables, notes=notes, results={"phases": stats, "runs": runs})
    return stats


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override passed on to finetune train")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the run (default: torch's own choice, as a "
                                                "user gets; --tiny: 1)")
    p.add_argument("--compare", type=Path, metavar="CHECKOUT",
                   help="another checkout of finetune (e.g. a git worktree of an older commit) to run in turns "
                        "with this one")
    p.add_argument("--rounds", type=int, default=2, help="with --compare: runs per side")
    args = p.parse_args(argv)
    if args.tiny and args.threads is None:
        args.threads = 1  # tiny steps on two threads crawl when the shared machine is busy
    if args.tiny and args.compare:
        args.rounds = 1
    overrides = [*(TINY_SETS if args.tiny else ()), *args.overrides]
    return compare(args, overrides, argv) if args.compare else single(args, overrides, argv)


if __name__ == "__main__":
    main()
