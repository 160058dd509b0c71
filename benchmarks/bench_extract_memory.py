"""Peak RAM of feature extraction: streamed into the float16 memory map vs stacked in RAM (target <= 1.2x).

    python benchmarks/bench_extract_memory.py DIR/bird225/train   # photos of a folder written by make_dataset.py
    python benchmarks/bench_extract_memory.py --tiny              # seconds; the smoke test (writes a tiny folder)

Each variant runs in a fresh process, which measures its resident set size (RSS) just before the
extraction and its peak (``ru_maxrss``) after, and reports the difference over the size of the cache it
wrote (float16 ``train.npy`` + ``val.npy``):

* ``streamed``: ``stage_features`` as training runs it: each batch written into a preallocated float16
  memory-mapped ``.npy``.
* ``in RAM``: the former path: ``extract_features`` (float32 batches, concatenated) per view, stacked,
  cast to float16, saved.

The images: ``--images`` photos of the benchmark folder (a folder of class folders, e.g. make_dataset's
``bird225/train``) drawn with a fixed seed from every class, the planted bad files listed in its
``dataset.json`` left out; 4/5 of them are the train split (2 augmented views), the rest val. They are
decoded and transformed by finetune's own pipelines at the backbone's input size and go through a real
timm backbone (``--backbone``, random init: memory does not depend on the weights). Before measuring,
each process runs the same extraction on the first 192 of the photos: what does not grow with the number
of images (the backbone's activations for a batch, the batch the loop holds while it decodes the next)
sets a high-water mark of RSS, so "extra" is the peak over the larger of that mark and the RSS before:
what holding the features costs, which is what grows with a data set.
"""
from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import _common

TARGET = 1.2
BATCH = 64
WARM = 3 * BATCH  # photos of the warm-up extraction: more than one batch per view


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sample_photos(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, int]]:
    """``n`` ``(path, class index)`` drawn with ``seed`` round-robin over the class folders of
    ``folder`` (planted bad files, listed in a ``dataset.json`` above it, left out)."""
    from finetune.data import IMAGE_EXTENSIONS

    bad: set[str] = set()
    for parent in (folder, *folder.parents[:2]):
        if (parent / "dataset.json").is_file():
            doc = json.loads((parent / "dataset.json").read_text())
            bad = {str((parent / v["root"] / bad["path"]).resolve()) for v in doc["variants"].values()
                   for bad in v["bad_files"]}
            break
    rng = random.Random(seed)
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    pools = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in cls.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and str(p.resolve()) not in bad)
        rng.shuffle(files)
        pools.append([(p, label) for p in files])
    picked: list[tuple[Path, int]] = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return picked


def child(variant: str, spec: dict[str, Any]) -> None:
    """Run one extraction in this process and print its memory figures as JSON."""
    import numpy as np
    import torch

    from finetune.data import ImageDataset, preprocessing_transform
    from finetune.models.factory import resolve_preprocessing
    from finetune.models import create_model
    from finetune.features import cache as fc
    from finetune.features import extract as fx
    from finetune._distributed import DistInfo

    torch.set_num_threads(1)
    cache = Path(spec["cache"])
    photos = [(Path(p), label) for p, label in spec["photos"]]
    model = create_model(spec["backbone"], max(label for _, label in photos) + 1, head="linear", pretrained=False)
    backbone, width = model.backbone.eval(), model.num_features
    prep = resolve_preprocessing(model.data_config(), input_size=spec.get("input_size"))
    train_tf, eval_tf = preprocessing_transform(prep, train=True), preprocessing_transform(prep)

    def splits(photos):  # 4/5 train, the rest val
        return {"train": photos[:len(photos) * 4 // 5], "val": photos[len(photos) * 4 // 5:]}

    run = dict(device=torch.device("cpu"), amp_dtype=None, batch_size=BATCH, num_workers=0)

    def extract(items, cache):
        if variant == "streamed":
            datasets = {"train": ImageDataset(items["train"], train_tf), "val": ImageDataset(items["val"], eval_tf)}
            fc.stage_features(backbone, items, datasets=datasets, views=2,
                              key_parts={}, cache_dir=cache, max_bytes=2**40, num_features=width, dist=DistInfo(),
                              seed=0, **run)
            [entry] = [p for p in (cache / "features").iterdir() if not p.name.startswith(".")]
            return entry
        entry = cache / "in-ram"
        entry.mkdir(parents=True)
        views = [fx.extract_features(backbone, ImageDataset(items["train"], train_tf), **run)[0] for _ in range(2)]
        np.save(entry / "train.npy", np.stack(views).astype(np.float16))
        del views
        feats = fx.extract_features(backbone, ImageDataset(items["val"], eval_tf), **run)[0]
        np.save(entry / "val.npy", feats[None].astype(np.float16))
        return entry

    # imports, and the same extraction of the first WARM photos: what does not grow with the data set (the
    # activations of a batch, the batch the loop holds while the next one is decoded) sets a high-water mark
    extract(splits(photos[:WARM]), cache.with_name(cache.name + "-warm"))
    before, warm_peak = _rss_mb(), _peak_mb()
    entry = extract(splits(photos), cache)
    peak = _peak_mb()
    cache_mb = sum((entry / f).stat().st_size for f in ("train.npy", "val.npy")) / 2**20
    print(json.dumps({"before_mb": before, "warm_peak_mb": warm_peak, "peak_mb": peak,
                      "extra_mb": peak - max(before, warm_peak),
                      "extra_over_before_mb": peak - before, "cache_mb": cache_mb, "width": width}))


def run_child(variant: str, spec: dict) -> dict:
    """One variant's extraction in a fresh process. The spec (every photo's path) goes on stdin: as one
    argument it failed with E2BIG past ~1,500 photos (Linux caps one argument at 128 KiB)."""
    out = subprocess.run([sys.executable, __file__, "--child", variant], input=json.dumps(spec),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, nargs="?", help="a folder of class folders of photos, e.g. bird225/train "
                                                         "of a folder written by make_dataset.py (not with --tiny)")
    p.add_argument("--backbone", default="resnet50", help="the timm backbone (random init)")
    p.add_argument("--input-size", type=int, help="pixels (default: the backbone's own input size)")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.tiny:
        args.backbone, args.images, args.repeats = "test_resnet", 24, 1
    elif args.dataset is None:
        p.error("give the DATASET folder (e.g. DIR/bird225/train of python benchmarks/make_dataset.py DIR), or --tiny")
    started = time.perf_counter()

    results: dict[str, list[dict]] = {"streamed": [], "in RAM": []}
    with tempfile.TemporaryDirectory(prefix="bench-extract-memory-") as tmp:
        dataset = args.dataset
        if args.tiny and dataset is None:
            import make_dataset

            make_dataset.generate(Path(tmp) / "data", classes=4, per_class=6, eval_per_class=1, caltech_classes=3,
                                  caltech_per_class=4, specials=1, workers=1)
            dataset = Path(tmp) / "data" / make_dataset.BIRD / "train"
        photos = sample_photos(dataset, args.images)
        args.images = len(photos)  # all of them when the folder holds fewer
        spec = {"backbone": args.backbone, "input_size": args.input_size,
                "photos": [(str(path), label) for path, label in photos]}
        for r in range(args.repeats):
            for variant in (results if r % 2 == 0 else reversed(list(results))):
                cache = Path(tmp) / f"cache-{variant.replace(' ', '')}-{r}"
                results[variant].append(run_child(variant, {**spec, "cache": str(cache)}))
                print(f"  {variant} {r + 1}/{args.repeats}: {results[variant][-1]}", file=sys.stderr, flush=True)
    stats, rows = {}, []
    for variant, runs in results.items():
        ratio = _common.median([r["extra_mb"] / r["cache_mb"] for r in runs])
        stats[variant] = {"extra_over_cache": ratio, "extra_mb": _common.median([r["extra_mb"] for r in runs]),
                          "extra_over_before_mb": _common.median([r["extra_over_before_mb"] for r in runs]),
                          "cache_mb": runs[0]["cache_mb"], "runs": runs}
        rows.append([variant, f"{runs[0]['cache_mb']:.1f}", f"{stats[variant]['extra_mb']:.1f}", f"{ratio:.2f}x",
                     f"{stats[variant]['extra_over_before_mb']:.0f}"])
    new, old = stats["streamed"], stats["in RAM"]
    width = results["streamed"][0]["width"]
    classes = len({label for _, label in photos})
    summary = [f"Extraction of {args.images:,} benchmark-folder photos ({classes} classes of "
               f"{dataset.parent.name}/{dataset.name}), {args.backbone} at "
               f"{f'{args.input_size} px' if args.input_size else 'its input size'} (random init, "
               f"{width}-wide features), 2 train views, into a {new['cache_mb']:.1f} MB float16 cache: peak extra "
               f"RSS {new['extra_over_cache']:.2f}x the cache streamed (target <= {TARGET}x), "
               f"{old['extra_over_cache']:.2f}x stacked in RAM as before."]
    tables = [_common.table(
        f"Peak RSS over the extraction minus the larger of the RSS before it and the peak of a warm-up extraction of "
        f"the first {WARM} photos; medians of {args.repeats} fresh process(es) per variant, interleaved.",
        ["variant", "cache MB", "peak extra RSS MB", "extra / cache", "peak over RSS before, MB (activations included)"],
        rows)]
    notes = ["The streamed extraction hands the memory map's written pages back to the kernel every 8 MB "
             "(madvise DONTNEED: they stay in the page cache, which the kernel writes back and may drop) and "
             "trims the C heap (glibc malloc_trim): before, RSS held every written page (about 1x the cache) "
             "plus ~20 MB of freed memory in the malloc arenas of the threads that fingerprint the files.",
             f"Batch {BATCH}, one torch thread, num_workers 0 (decoding in the measured process). The backbone's "
             "activations for a batch and the input batch the loop holds while it decodes the next are the same in "
             "both variants and do not grow with the data set; the warm-up's high-water mark takes them out."]
    _common.write_result(
        args.out, "extract_memory", title="Feature extraction: peak RAM streamed vs in RAM",
        command=_common.command_line("bench_extract_memory.py", [a for a in (argv or sys.argv[1:])
                                                                  if a != str(args.dataset)]),
        tiny=args.tiny, wall_s=time.perf_counter() - started,
        settings={"images": args.images, "repeats": args.repeats, "width": width, "views": 2,
                  "input_size": args.input_size or "the backbone's", "warm_up_photos": WARM,
                  "dataset": "tiny" if args.tiny else str(dataset), "backbone": args.backbone},
        summary=summary, tables=tables, notes=notes, results={"variants": stats, "target": TARGET})
    return stats


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.stdin.read()))
    else:
        main()
