"""Peak RAM of feature extraction: streamed into the float16 memory map vs stacked in RAM (target <= 1.2x).

    python benchmarks/bench_extract_memory.py          # 3,000 images, 8,160-wide features, 2 views
    python benchmarks/bench_extract_memory.py --tiny   # seconds; the smoke test

Each variant runs in a fresh process, which measures its resident set size (RSS) just before the
extraction and its peak (``ru_maxrss``) after, and reports the difference over the size of the cache it
wrote (float16 ``train.npy`` + ``val.npy``):

* ``streamed``: ``stage_features`` as training runs it: each batch written into a preallocated float16
  memory-mapped ``.npy``.
* ``in RAM``: the former path: ``extract_features`` (float32 batches, concatenated) per view, stacked,
  cast to float16, saved.

The images are small PNGs and the backbone a weightless pooling to 3x32x85 = 8,160 features, so the
features dominate what the process holds (as a wide backbone's do on a real data set: 2,048-wide features
of 50,000 images are 200 MB in float16) and the extraction takes seconds.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import _common

TARGET = 1.2
WIDTH = 3 * 32 * 85


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(variant: str, folder: Path, cache: Path) -> None:
    """Run one extraction in this process and print its memory figures as JSON."""
    import numpy as np
    import torch

    from finetune.data import ImageDataset, build_transform
    from finetune.training import feature_cache as fc
    from finetune.training.distributed import DistInfo

    paths = sorted(folder.rglob("*.png"))
    split = len(paths) * 4 // 5
    items = {"train": [(p, i % 3) for i, p in enumerate(paths[:split])],
             "val": [(p, i % 3) for i, p in enumerate(paths[split:])]}
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((32, 85)), torch.nn.Flatten())
    transform = build_transform(False, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    run = dict(device=torch.device("cpu"), amp_dtype=None, batch_size=64, num_workers=0)

    def extract(items, cache):
        if variant == "streamed":
            fc.stage_features(backbone, items, train_transform=transform, eval_transform=transform, views=2,
                              key_parts={}, cache_dir=cache, max_bytes=2**40, num_features=WIDTH, dist=DistInfo(),
                              seed=0, **run)
            [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
            return entry
        entry = cache / "in-ram"
        entry.mkdir(parents=True)
        views = [fc.extract_features(backbone, ImageDataset(items["train"], transform), **run)[0] for _ in range(2)]
        np.save(entry / "train.npy", np.stack(views).astype(np.float16))
        del views
        feats = fc.extract_features(backbone, ImageDataset(items["val"], transform), **run)[0]
        np.save(entry / "val.npy", feats[None].astype(np.float16))
        return entry

    extract({split: rows[:4] for split, rows in items.items()}, cache.with_name(cache.name + "-warm"))  # imports
    before = _rss_mb()
    entry = extract(items, cache)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cache_mb = sum((entry / f).stat().st_size for f in ("train.npy", "val.npy")) / 2**20
    print(json.dumps({"before_mb": before, "peak_mb": peak, "extra_mb": peak - before, "cache_mb": cache_mb}))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.repeats = 60, 1
    started = time.perf_counter()
    from PIL import Image

    results: dict[str, list[dict]] = {"streamed": [], "in RAM": []}
    with tempfile.TemporaryDirectory(prefix="bench-extract-memory-") as tmp:
        folder = Path(tmp) / "images"
        for i in range(args.images):
            path = folder / f"c{i % 3}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_common.synthetic_photo(40, 40, i)).save(path)
        for r in range(args.repeats):
            for variant in (results if r % 2 == 0 else reversed(list(results))):
                cache = Path(tmp) / f"cache-{variant.replace(' ', '')}-{r}"
                out = subprocess.run([sys.executable, __file__, "--child", variant, str(folder), str(cache)],
                                     check=True, capture_output=True, text=True)
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    stats, rows = {}, []
    for variant, runs in results.items():
        ratio = _common.median([r["extra_mb"] / r["cache_mb"] for r in runs])
        stats[variant] = {"extra_over_cache": ratio, "extra_mb": _common.median([r["extra_mb"] for r in runs]),
                          "cache_mb": runs[0]["cache_mb"], "runs": runs}
        rows.append([variant, f"{runs[0]['cache_mb']:.0f}", f"{stats[variant]['extra_mb']:.0f}", f"{ratio:.2f}x"])
    new, old = stats["streamed"], stats["in RAM"]
    summary = [f"Extraction of {args.images} images (2 train views, {WIDTH}-wide features) into a "
               f"{new['cache_mb']:.0f} MB float16 cache: peak extra RSS {new['extra_over_cache']:.2f}x the cache "
               f"streamed (target <= {TARGET}x), {old['extra_over_cache']:.2f}x stacked in RAM as before."]
    tables = [_common.table(f"Peak RSS over the extraction minus RSS before it; medians of {args.repeats} "
                            "fresh process(es) per variant, interleaved.",
                            ["variant", "cache MB", "peak extra RSS MB", "extra / cache"], rows)]
    notes = ["RSS counts the memory map's written pages (page cache the kernel may write back and drop): "
             "the streamed variant's extra RAM is mostly those pages, about 1x the cache."]
    _common.write_result(
        args.out, "extract_memory", title="Feature extraction: peak RAM streamed vs in RAM",
        command=_common.command_line("bench_extract_memory.py", argv), tiny=args.tiny,
        wall_s=time.perf_counter() - started, settings={"images": args.images, "repeats": args.repeats,
                                                        "width": WIDTH, "views": 2},
        summary=summary, tables=tables, notes=notes, results={"variants": stats, "target": TARGET})
    return stats


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
