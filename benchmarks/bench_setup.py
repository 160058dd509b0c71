"""Setup time of a run (scan + split + manifest): a first run against a second one that finds the scan cache.

    python benchmarks/bench_setup.py DATASET   # a folder written by make_dataset.py
    python benchmarks/bench_setup.py --tiny    # seconds; the smoke test (writes a tiny dataset)

Setup is what ``finetune train`` does before building a model: ``prepare_manifest`` (discover the folder,
read, hash and decode every image, split, the quick leakage check) and writing the manifest CSV. Each round
times it twice on both variants of the benchmark dataset (the pre-split Bird-225-shaped folder and the
one-folder Caltech-shaped one, which is split): once with an empty scan cache (a first run) and once more
with the cache the first one filled (every later run). Rounds are repeated with a fresh cache each time;
the files stay in the OS page cache, so the first run's figure is a warm-disk one (a cold disk only
widens the gap).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import _common


def setup_seconds(root: Path, cache: Path, work: Path) -> tuple[float, int]:
    """Seconds of one setup of ``root`` with the scan cache ``cache``, and the manifest's image count."""
    from finetune.data import prepare_manifest

    start = time.perf_counter()
    manifest, _ = prepare_manifest(root, report_path=work / "bad_files.csv", scan_cache=cache)
    manifest.write_csv(work / "manifest.csv")
    return time.perf_counter() - start, len(manifest)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, nargs="?", help="folder written by make_dataset.py (not with --tiny)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import make_dataset

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-setup-") as tmp:
        tmp = Path(tmp)
        dataset = args.dataset
        if args.tiny or dataset is None:
            if not args.tiny:
                p.error("give the DATASET folder (python benchmarks/make_dataset.py DIR), or --tiny")
            dataset = tmp / "dataset"
            make_dataset.generate(dataset, classes=4, per_class=3, eval_per_class=1, caltech_classes=3,
                                  caltech_per_class=4, specials=1, workers=1)
            args.rounds = 1
        variants = {"bird225 (pre-split)": dataset / make_dataset.BIRD,
                    "caltech (one folder, split)": dataset / make_dataset.CALTECH}
        results = {}
        for name, root in variants.items():
            first, second, images = [], [], 0
            for r in range(args.rounds):
                cache = tmp / f"scan-{name[:4]}-{r}.sqlite3"
                seconds, images = setup_seconds(root, cache, tmp)
                first.append(seconds)
                second.append(setup_seconds(root, cache, tmp)[0])
                print(f"  {name} round {r + 1}/{args.rounds}: first {first[-1]:.2f}s, second {second[-1]:.3f}s",
                      flush=True)
            ratios = _common.paired_ratios(first, second)
            results[name] = {"images": images, "first_s": first, "second_s": second, "speedup": ratios,
                             "median_speedup": _common.median(ratios)}
    wall = time.perf_counter() - wall
    summary = [
        f"Setup (scan + split + manifest) of {r['images']:,} usable images, {name}: first run "
        f"{_common.median(r['first_s']):.2f} s, second run {_common.median(r['second_s']):.3f} s: "
        f"{r['median_speedup']:.0f}x faster (target >= 20x)."
        for name, r in results.items()
    ]
    rows = [[name, r["images"], f"{_common.median(r['first_s']):.2f}", f"{_common.median(r['second_s']):.3f}",
             f"{r['median_speedup']:.1f}x", ", ".join(f"{x:.0f}x" for x in r["speedup"])]
            for name, r in results.items()]
    tables = [_common.table(f"Medians over {args.rounds} round(s), each with a fresh scan cache.",
                            ["variant", "usable images", "first run s", "second run s", "speedup", "per round"], rows)]
    _common.write_result(
        args.out, "setup", title="Setup time: the scan cache",
        command=_common.command_line("bench_setup.py", [a for a in (argv or sys.argv[1:]) if a != str(args.dataset)]),
        tiny=args.tiny, wall_s=wall, settings={"dataset": str(dataset) if not args.tiny else "tiny",
                                               "rounds": args.rounds},
        summary=summary, tables=tables, results=results,
        notes=["Files in the OS page cache for both runs: the first run's time is its decode and hash work, not disk reads."],
    )
    return results


if __name__ == "__main__":
    main()
