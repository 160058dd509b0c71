"""`finetune data split` end to end, start-up included: a first run on a folder against a second on the unchanged
folder, on look-alike images and on distinct ones.

    python benchmarks/bench_split.py            # 225 classes x 40 JPEGs per folder
    python benchmarks/bench_split.py --tiny     # seconds; the smoke test

Each run is the command a user types, ``python -m finetune data split ROOT --out ROOT/split.csv --val 0.2 --test
0.1``, in a fresh process (interpreter and import start-up included) with its own scan cache
(``FINETUNE_CACHE``). Folders (one class folder each, split by the command):

* **look-alike**: per class, smooth fields of one palette with a faint per-image texture, the benchmark's own
  kind of image: many images of a class share a perceptual hash, so the quick leak check compares many
  cross-split pairs by their thumbnails;
* **distinct**: ``synthetic_photo`` images (shapes and noise), whose hashes rarely collide.

A round times the first run (empty scan cache) and the second (the cache the first filled); rounds start from a
fresh cache. The ratio is first / second per round; ``import`` is the seconds ``python -c "import
finetune.cli.data, finetune.data.prepare"`` takes, which is what the command loads before its work.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import _common
from finetune.data._scan_cache import RACY_SECONDS


def write_folder(root: Path, classes: int, per_class: int, kind: str) -> int:
    import cv2
    import numpy as np
    from PIL import Image

    for c in range(classes):
        rng = np.random.default_rng([c, 7])
        low = rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)
        field = cv2.resize(low, (160, 120), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if kind == "look-alike":
                texture = rng.normal(0, 3, (120, 160, 1)).astype(np.float32)
                image = np.clip(field + texture + rng.normal(0, 2, 3), 0, 255).astype(np.uint8)
            else:
                image = _common.synthetic_photo(120, 160, seed=c * per_class + i)
            Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=90)
    return classes * per_class


def run_split(root: Path, cache: Path) -> float:
    env = {**os.environ, "FINETUNE_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "data", "split", str(root), "--out", str(root / "split.csv"),
                    "--val", "0.2", "--test", "0.1", "--seed", "0"], env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    (root / "split.csv").unlink()
    return seconds


def import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import finetune.cli.data, finetune.data.prepare"], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=225)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if args.tiny:
        args.classes, args.per_class, args.rounds = 3, 6, 1
    wall = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        tmp = Path(tmp)
        for kind in ("look-alike", "distinct"):
            root = tmp / kind
            images = write_folder(root, args.classes, args.per_class, kind)
            time.sleep(RACY_SECONDS + 0.5)  # files changed within RACY_SECONDS are not recorded by the scan cache
            first, second = [], []
            for r in range(args.rounds):
                cache = tmp / f"cache-{kind}-{r}"
                first.append(run_split(root, cache))
                second.append(run_split(root, cache))
                print(f"{kind} round {r + 1}: first {first[-1]:.1f}s, second {second[-1]:.1f}s", file=sys.stderr)
            results[kind] = {"images": images, "first_s": _common.spread(first), "second_s": _common.spread(second),
                             "ratio": _common.spread(_common.paired_ratios(first, second)), "raw": [first, second]}
        results["import_s"] = _common.spread([import_seconds() for _ in range(3)])
    rows = [[kind, r["images"], r["first_s"]["median"], r["second_s"]["median"], r["ratio"]["median"],
             f"{r['ratio']['min']:.1f}-{r['ratio']['max']:.1f}"]
            for kind, r in results.items() if kind != "import_s"]
    summary = [f"finetune data split, {kind} ({r['images']} JPEGs): first {r['first_s']['median']:.1f} s, second "
               f"{r['second_s']['median']:.1f} s on the unchanged folder = {r['ratio']['median']:.1f}x faster."
               for kind, r in results.items() if kind != "import_s"]
    summary.append(f"The command's imports take {results['import_s']['median']:.2f} s.")
    _common.write_result(
        args.out, "split", title="finetune data split: a first and a second run on an unchanged folder",
        command=_common.command_line("bench_split.py", argv), tiny=args.tiny, wall_s=time.perf_counter() - wall,
        settings={"classes": args.classes, "per_class": args.per_class, "rounds": args.rounds, "tiny": args.tiny},
        summary=summary, tables=[_common.table(
            f"Seconds per run (median of {args.rounds} rounds, each with a fresh scan cache), start-up included; "
            "first / second: median of per-round ratios (range).",
            ["folder", "images", "first run s", "second run s", "first / second", "range"], rows)],
        results=results,
    )
    return results


if __name__ == "__main__":
    main()
