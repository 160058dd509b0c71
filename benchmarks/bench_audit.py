"""`finetune data audit` on the digits with planted problems: what it finds and how long it takes.

    python benchmarks/bench_audit.py          # digits, tf_efficientnet_lite0 offline, 64 px
    python benchmarks/bench_audit.py --tiny   # seconds; the smoke test (test_resnet, random init, 32 px)

A copy of the digits is split as training splits it, then given planted problems, listed in a manifest:
5 % of the training labels flipped, 20 training images copied into val/test after a resize (32 -> 45 px),
a JPEG re-encode (quality 75) or a 2-pixel crop on each side, and 10 uniform-noise images added to train
as outliers. The audit runs twice on a fresh feature cache: the first run extracts the features, the
second reads them from the cache. Measured: precision of the top-k label issues (k = flips), recall of
the planted copies (copy and source in one group), leaking groups made only of untouched images, planted
outliers among the top 20, and the seconds of each step.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import _common


def plant(root: Path, seed: int = 0) -> tuple[Path, dict]:
    """Write the planted manifest ``root/planted.csv`` (module docstring); return it and the planted paths."""
    from PIL import Image

    from finetune.data import Manifest, ManifestRow, prepare_manifest

    manifest, _ = prepare_manifest(root)
    rng = np.random.default_rng(seed)
    rows = list(manifest.rows)
    train = rng.permutation([i for i, r in enumerate(rows) if r.split == "train"])
    flips, sources = train[: round(0.05 * len(train))], train[len(train) // 2: len(train) // 2 + 20]
    for i in flips:
        rows[i] = rows[i]._replace(label=str((int(rows[i].label) + rng.integers(1, 10)) % 10))
    (root / "planted").mkdir(exist_ok=True)
    copies, outliers = {}, []
    for k, i in enumerate(sources):
        image = Image.open(root / rows[i].path).convert("RGB")
        w, h = image.size
        name, image = [(f"planted/resized{k}.png", image.resize((w * 45 // 32, h * 45 // 32), Image.Resampling.BICUBIC)),
                       (f"planted/reencoded{k}.jpg", image),
                       (f"planted/cropped{k}.png", image.crop((2, 2, w - 2, h - 2)))][k % 3]
        image.save(root / name, quality=75) if name.endswith(".jpg") else image.save(root / name)
        rows.append(ManifestRow(name, rows[i].label, ("val", "test")[k % 2]))
        copies[name] = rows[i].path
    for k in range(10):
        name = f"planted/noise{k}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name)
        rows.append(ManifestRow(name, str(k % len(manifest.classes)), "train"))
        outliers.append(name)
    path = Manifest(root, rows).write_csv(root / "planted.csv")
    return path, {"flipped": {rows[i].path for i in flips}, "copies": copies, "outliers": set(outliers)}


def figures(audit, planted: dict) -> dict:
    k = len(planted["flipped"])
    top = {r["path"] for r in audit.label_issues[:k]}
    grouped = {p: g for g in audit.near_duplicates for p in g["paths"]}
    found = [c for c, s in planted["copies"].items() if c in grouped and s in grouped[c]["paths"]]
    touched = {p for pair in planted["copies"].items() for p in pair}
    false_leaks = [g["paths"] for g in audit.near_duplicates if g["leak"] and not set(g["paths"]) <= touched]
    top20 = {o["path"] for o in audit.outliers[:20]}
    return {"flips": k, "label_issues": len(audit.label_issues),
            "label_precision_at_k": len(top & planted["flipped"]) / k,
            "duplicate_recall": len(found) / len(planted["copies"]), "false_leaks": len(false_leaks),
            "outliers_in_top20": len(planted["outliers"] & top20) / len(planted["outliers"])}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--input-size", type=int, default=64)
    args = p.parse_args(argv)
    from finetune.data import write_digits
    from finetune.audit import audit_dataset

    model = dict(backbone="test_resnet", pretrained=False, input_size=32) if args.tiny else \
        dict(backbone="tf_efficientnet_lite0", pretrained="offline", input_size=args.input_size)
    wall = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        root = write_digits(Path(tmp) / "digits", size=32)
        if args.tiny:
            root = _common.digits_folder(Path(tmp), per_class=20, source=root)
        manifest, planted = plant(root)
        for run in ("extract", "cached"):
            start = time.perf_counter()
            audit = audit_dataset(manifest, device="cpu", cache_dir=Path(tmp) / "cache", batch_size=128, **model)
            runs[run] = {"wall_s": round(time.perf_counter() - start, 2), "features_cached": audit.features_cached,
                         "seconds": {k: round(v, 2) for k, v in audit.seconds.items()}}
        found = figures(audit, planted)
        images = len(audit.manifest)
    wall = time.perf_counter() - wall
    name = f"{model['backbone']} at {model['input_size']} px"
    summary = [
        f"Digits with planted problems ({images} images; {name}): top-{found['flips']} label-issue precision "
        f"{found['label_precision_at_k']:.2f} (target >= 0.8), near-duplicate recall {found['duplicate_recall']:.2f} "
        f"(target >= 0.95), {found['false_leaks']} false leak(s) among untouched images (target 0), planted outliers "
        f"in the top 20: {found['outliers_in_top20']:.0%} (target 100%).",
        f"Audit wall time {runs['extract']['wall_s']:.1f}s with feature extraction, {runs['cached']['wall_s']:.1f}s "
        "with cached features (the scan of the images and the model build included).",
    ]
    rows = [[run, r["wall_s"], *(r["seconds"].get(k) for k in ("features", "duplicates", "labels", "outliers"))]
            for run, r in runs.items()]
    tables = [_common.table("Seconds per step (features: extraction or cache read, cache key included).",
                            ["run", "wall s", "features s", "near-duplicates s", "label issues s", "outliers s"], rows)]
    notes = ["No benchmark folder of the scale issue exists in this repository, so only the digits are timed.",
             "The planting is the same as tests/test_audit.py's planted-problems test."]
    _common.write_result(
        args.out, "audit", title="Data audit: planted problems on the digits",
        command=_common.command_line("bench_audit.py", argv), tiny=args.tiny, wall_s=wall,
        settings={**{k: str(v) for k, v in model.items()}, "images": images, "tiny": args.tiny},
        summary=summary, tables=tables, results={"figures": found, "runs": runs}, notes=notes,
    )
    return {"figures": found, "runs": runs}


if __name__ == "__main__":
    main()
