"""Train loader images/s: finetune from JPEG files and from its pixel store, against timm's create_loader and
torchvision ImageFolder + v2, with the same ops on the same files.

    python benchmarks/bench_loader.py            # 256 images of each shape, 1 and 2 workers
    python benchmarks/bench_loader.py --tiny     # seconds; the smoke test

Each variant is a DataLoader (batch 32, persistent workers) yielding the batch the model gets on this machine's
device: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip, normalised:

* ``finetune, files``: ``ImageDataset`` over the JPEGs (decode by ``load_image``) in the training loader
  (``make_loader`` as training builds it, the workers collating into their buffer pool), uint8 out of the
  workers, normalised in the main process by ``DeviceBatches`` (on a GPU: on the device);
* ``finetune, store (raw)``: the same, read from the decoded-pixel store (``data.store: auto``: shorter side
  280 px before a 224 crop), no decode at all;
* ``finetune, store (JPEG q95)``: the store's over-budget codec (what the old resize cache kept per file);
* ``finetune, store (raw), no buffer pool``: the raw store with each batch collated into a new shared-memory
  file, as before the workers' ``BatchPool`` (``make_loader(reuse_buffers=False)``);
* ``timm create_loader``: ``timm.data.create_loader`` over ``timm.data.ImageDataset`` of the same folder,
  ``is_training``, colour jitter off, with its prefetcher (uint8 ``fast_collate``, normalised by its
  ``PrefetchLoader``);
* ``torchvision ImageFolder + v2``: ``decode_image`` to a uint8 tensor, ``v2.RandomResizedCrop`` (antialias)
  + flip, ``ToDtype`` + ``Normalize`` in the workers (float32 out).

Throughput is timed on the batches the workers deliver (per worker: divided by the workers), and for finetune's
store and timm's prefetcher also on the batch made ready for the model (normalised: on this CPU by the main
process, which then competes with the workers for the cores; on a GPU by the device).

Shapes: Bird-225-like 224 px JPEGs and Caltech-101-like larger ones (300x200 to 1000x800). Rounds (one epoch of
every variant) are interleaved; the first epoch of each loader is a warm-up (worker start, page cache). The A/A
row times ``finetune, files`` against itself, the spread every ratio here should be read against. Bytes per
image are those of the batch tensor that crosses to the device.
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import _common

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, BATCH = 224, 32


def write_folder(root: Path, count: int, shape: str, classes: int = 4) -> list[tuple[Path, int]]:
    """``count`` JPEG photos under ``root/<class>/``: 224 px squares-ish (bird) or 300x200-1000x800 (caltech)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        if shape == "bird":
            width, height = 224, 224
        else:
            width, height = int(rng.integers(300, 1001)), int(rng.integers(200, 801))
        label = i % classes
        path = root / f"c{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_common.synthetic_photo(height, width, seed=i)).save(path, quality=90)
        items.append((path, label))
    return items


def loaders(root: Path, items, workers: int, cache: Path) -> tuple[dict, dict]:
    """Each variant's loader factory (a fresh loader per call) and the store build seconds."""
    import torch
    from timm.data import ImageDataset as TimmImageDataset
    from timm.data import create_loader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from finetune.data import DeviceBatches, ImageDataset, build_store, build_transform, store_plan
    from finetune.training.loaders import make_loader

    pipeline = build_transform(True, input_size=SIZE, mean=MEAN, std=STD, interpolation="bicubic",
                               ops=[{"name": "RandomResizedCrop", "size": (SIZE, SIZE), "scale": (0.08, 1.0)},
                                    {"name": "HorizontalFlip"}], device_normalize=True)
    plan, rest, _ = store_plan(pipeline, "auto")
    builds = {}
    start = time.perf_counter()
    raw = build_store(items, plan, cache_dir=cache / "raw", workers=workers)
    builds["raw"] = time.perf_counter() - start
    start = time.perf_counter()
    jpeg = build_store(items, plan, cache_dir=cache / "jpeg", workers=workers, budget=0)
    builds["jpeg"] = time.perf_counter() - start
    cpu = torch.device("cpu")

    def ours(store, pool=True):  # the training loader (make_loader as training builds it: workers, prefetch,
        # worker_init and, unless pool is False, the workers' buffer pool)
        dataset = ImageDataset(items, rest if store is not None else pipeline, seed=0, store=store)
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
        return DeviceBatches(make_loader(dataset, sampler=sampler, batch_size=BATCH, num_workers=workers, device=cpu,
                                         train=True, reuse_buffers=pool), cpu, pipeline.batch_normalize)

    def timm_loader():
        return create_loader(TimmImageDataset(str(root)), input_size=(3, SIZE, SIZE), batch_size=BATCH,
                             is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0,
                             interpolation="bicubic", mean=MEAN, std=STD, num_workers=workers, device=cpu,
                             use_prefetcher=True, persistent_workers=workers > 0)

    def torchvision_loader():
        transform = v2.Compose([v2.RandomResizedCrop(SIZE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                                v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        folder = ImageFolder(str(root), loader=_decode_rgb, transform=transform)
        return torch.utils.data.DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=workers,
                                           persistent_workers=workers > 0)

    assert raw.meta["codec"] == "raw" and jpeg.meta["codec"].startswith("jpeg")
    return {"finetune, files": lambda: ours(None), "finetune, files (A/A)": lambda: ours(None),
            "finetune, store (raw)": lambda: ours(raw), "finetune, store (JPEG q95)": lambda: ours(jpeg),
            "finetune, store (raw), no buffer pool": lambda: ours(raw, pool=False),
            "timm create_loader": timm_loader, "torchvision ImageFolder + v2": torchvision_loader}, builds


def _decode_rgb(path: str):
    from torchvision import io as tvio

    return tvio.decode_image(tvio.read_file(path), mode=tvio.ImageReadMode.RGB)


def epoch_rate(loader) -> float:
    """Images/s of one epoch of ``loader``; a batch from finetune's workers' buffer pool (a fourth item, its
    ticket) is handed back once counted, as the DeviceBatches that reads it in training does."""
    pool = getattr(loader, "collate_fn", None)
    release = getattr(pool, "release", None)
    if release is not None:
        pool.reclaim()
    count, start = 0, time.perf_counter()
    for batch in loader:
        count += len(batch[0])
        if release is not None and len(batch) == 4:
            release(batch[3])
    return count / (time.perf_counter() - start)


def bytes_to_device(loader) -> int:
    """Bytes per image of the batches that would cross to the device: those of the loader finetune's
    DeviceBatches or timm's PrefetchLoader wraps (what they normalise after the copy), else the loader's own."""
    inner = getattr(loader, "loader", loader)
    inputs = next(iter(inner))[0]
    return inputs.element_size() * inputs[0].nelement()


def measure(root: Path, items, workers: int, rounds: int, cache: Path) -> dict:
    factories, builds = loaders(root, items, workers, cache)
    made = {name: make() for name, make in factories.items()}
    sent = {name: bytes_to_device(loader) for name, loader in made.items()}
    # what the workers deliver (uint8 for finetune and timm's fast_collate, float32 for torchvision's v2), and
    # the batch made ready for the model: normalised, here in the main process (on a GPU, on the device)
    variants = {name: (lambda loader=loader: epoch_rate(getattr(loader, "loader", loader)))
                for name, loader in made.items()}
    for name in ("finetune, store (raw)", "timm create_loader"):
        variants[f"{name}, normalised"] = lambda loader=made[name]: epoch_rate(loader)
    for run in variants.values():  # warm-up epoch: worker start, page cache
        run()
    speeds = _common.interleave(variants, rounds=rounds, warmup=0)
    files = speeds["finetune, files"]
    return {
        "workers": workers,
        "images_per_s": {k: _common.spread(v) for k, v in speeds.items()},
        "images_per_s_per_worker": {k: _common.median(v) / max(workers, 1) for k, v in speeds.items()},
        "ratio_store_vs_files": _common.spread(_common.paired_ratios(speeds["finetune, store (raw)"], files)),
        "ratio_store_vs_timm": _common.spread(_common.paired_ratios(speeds["finetune, store (raw)"],
                                                                    speeds["timm create_loader"])),
        "ratio_files_vs_timm": _common.spread(_common.paired_ratios(files, speeds["timm create_loader"])),
        "ratio_a_a": _common.spread(_common.paired_ratios(speeds["finetune, files (A/A)"], files)),
        "ratio_pool": _common.spread(_common.paired_ratios(speeds["finetune, store (raw)"],
                                                           speeds["finetune, store (raw), no buffer pool"])),
        "bytes_per_image_to_device": sent,
        "store_build_s": builds,
        "raw_images_per_s": speeds,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs of each shape")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.workers, args.rounds = 2 * BATCH, [1], 1
    import cv2
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    wall = time.perf_counter()
    results = {}
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io's decoders (TorchCodec)
            for shape, label in (("bird", "Bird-225-like 224 px JPEG"), ("caltech", "Caltech-like 300x200-1000x800 JPEG")):
                root = Path(tmp) / shape
                items = write_folder(root, args.images, shape)
                for workers in args.workers:
                    print(f"{label}, {workers} worker(s)", file=sys.stderr)
                    results[f"{label}, {workers} worker(s)"] = measure(root, items, workers, args.rounds,
                                                                       Path(tmp) / f"cache-{shape}-{workers}")
    finally:
        torch.set_num_threads(threads)
    report(args, results, argv, time.perf_counter() - wall)
    return results


def report(args, results: dict, argv, wall: float) -> None:
    names = ["finetune, files", "finetune, store (raw)", "finetune, store (JPEG q95)",
             "finetune, store (raw), no buffer pool", "timm create_loader", "torchvision ImageFolder + v2"]
    ready = ["finetune, store (raw), normalised", "timm create_loader, normalised"]
    rows, summary, byte_rows = [], [], []
    for case, r in results.items():
        ips = r["images_per_s"]
        rows.append([case, *(ips[n]["median"] for n in names + ready), r["ratio_store_vs_files"]["median"],
                     r["ratio_store_vs_timm"]["median"], r["ratio_pool"]["median"],
                     f"{r['ratio_a_a']['min']:.2f}-{r['ratio_a_a']['max']:.2f}"])
        byte_rows.append([case, *(r["bytes_per_image_to_device"][n] for n in names),
                          f"{r['store_build_s']['raw']:.1f} / {r['store_build_s']['jpeg']:.1f}"])
        summary.append(
            f"{case}: store {ips['finetune, store (raw)']['median']:.0f} img/s = "
            f"{r['ratio_store_vs_files']['median']:.2f}x finetune from files, "
            f"{r['ratio_store_vs_timm']['median']:.2f}x timm create_loader (A/A {r['ratio_a_a']['min']:.2f}-"
            f"{r['ratio_a_a']['max']:.2f}); {r['images_per_s_per_worker']['finetune, store (raw)']:.0f} img/s per worker; "
            f"the workers' buffer pool {r['ratio_pool']['median']:.2f}x the store without it.")
    tables = [
        _common.table(f"Train loader images/s, side by side in one run (median of {args.rounds} interleaved epochs): "
                      "the batches the workers deliver, then two made ready for the model (normalised in the main "
                      "process of this CPU run; on a GPU, on the device). Ratios: median of per-epoch ratios of "
                      "delivered batches (pool: the store with the workers' buffer pool / without it, a new "
                      "shared-memory file per batch); A/A: finetune from files against itself, min-max.",
                      ["images, workers", *names, *ready, "store / files", "store / timm", "pool", "A/A"], rows),
        _common.table("Bytes per image crossing to the device (the batch tensor), and the store's one-off build "
                      "seconds (raw / JPEG).", ["images, workers", *names, "store build s"], byte_rows),
    ]
    notes = ["Workers and the main process run with one torch and OpenCV thread each; the machine's cores bound "
             "the worker counts tried.",
             "timm's prefetcher collates uint8 and normalises in the loader's process, as finetune's DeviceBatches "
             "does; torchvision's v2 pipeline normalises to float32 in each worker."]
    _common.write_result(
        args.out, "loader", title="Train loader: finetune (files, pixel store) vs timm and torchvision",
        command=_common.command_line("bench_loader.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"images": args.images, "workers": args.workers, "rounds": args.rounds, "batch": BATCH,
                  "size": SIZE, "tiny": args.tiny},
        summary=summary, tables=tables, notes=notes, results=results,
    )


if __name__ == "__main__":
    main()
