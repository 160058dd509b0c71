"""Data pipeline images/s: decode + augment through finetune's albumentations path vs torchvision's.

    python benchmarks/bench_data.py          # synthetic 500x375 JPEG photos and the digits PNGs
    python benchmarks/bench_data.py --tiny   # seconds; the smoke test

Per sample, from a file on disk to a normalised float32 3xHxW tensor:

* ``finetune``: ``ImageDataset(items, build_transform(...))[i]``: ``load_image`` (Pillow), the per-sample
  seeding of the augmentation, the albumentations/OpenCV ops, Normalize, ToTensorV2.
* ``torchvision (PIL)``: ``Image.open(path).convert("RGB")`` then ``torchvision.transforms`` on the PIL
  image, ToTensor, Normalize (the classic torchvision/timm path).
* ``torchvision v2 (tensor)``: ``torchvision.io.decode_image`` then ``transforms.v2`` on uint8 tensors.

Pipelines: the default train and eval pipelines at 224 px on the photos (RandomResizedCrop + flip;
resize the shorter side to 256 + centre crop), and the quickstart's train pipeline at 64 px on the digits
(Resize + Affine with p 0.8). Bicubic interpolation everywhere (tf_efficientnet_lite0's). One thread for
torch and OpenCV, as in a DataLoader worker, so the numbers are per worker core. Rounds (one pass over
the images per variant) are interleaved; medians.
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence


import _common

MEAN = (0.5, 0.5, 0.5)  # tf_efficientnet_lite0's
STD = (0.5, 0.5, 0.5)
QUICKSTART_TRAIN = [
    {"name": "Resize", "height": 64, "width": 64},
    {"name": "Affine", "scale": [0.9, 1.1], "translate_percent": [-0.06, 0.06], "rotate": [-10, 10], "p": 0.8},
]


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(_common.synthetic_photo(size[1], size[0], seed=i)).save(path, quality=90)
        paths.append(path)
    return paths


def dataset_photos(folder: Path, count: int) -> list[Path]:
    """``count`` JPEG files of ``folder`` (any depth), spread evenly over its sorted list."""
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")
                   and not p.name.startswith("zz_"))  # make_dataset.py's planted bad files
    step = max(1, len(found) // count)
    return found[::step][:count]


def pipelines(kind: str, size: int) -> dict[str, Callable]:
    """finetune's pipeline and torchvision's equivalents for ``kind`` (train, eval, quickstart)."""
    import torch
    from PIL import Image
    from torchvision import io as tvio
    from torchvision import transforms as T
    from torchvision.transforms import v2

    from finetune.data import build_transform

    bicubic = T.InterpolationMode.BICUBIC
    if kind == "train":
        ops, tv1, tv2 = None, [T.RandomResizedCrop(size, interpolation=bicubic), T.RandomHorizontalFlip()], \
            [v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True), v2.RandomHorizontalFlip()]
    elif kind == "eval":
        resize = int(size / 0.875)
        ops, tv1, tv2 = None, [T.Resize(resize, interpolation=bicubic), T.CenterCrop(size)], \
            [v2.Resize(resize, interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    else:  # the quickstart's train ops
        affine = dict(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1), interpolation=T.InterpolationMode.BILINEAR)
        ops = QUICKSTART_TRAIN
        tv1 = [T.Resize((size, size), interpolation=bicubic), T.RandomApply([T.RandomAffine(**affine)], p=0.8)]
        tv2 = [v2.Resize((size, size), interpolation=bicubic, antialias=True),
               v2.RandomApply([v2.RandomAffine(**affine)], p=0.8)]
    ours = build_transform(kind != "eval", input_size=size, mean=MEAN, std=STD, interpolation="bicubic", ops=ops)
    classic = T.Compose([*tv1, T.ToTensor(), T.Normalize(MEAN, STD)])
    tensor = v2.Compose([*tv2, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def torchvision_pil(path: Path):
        with Image.open(path) as img:
            return classic(img.convert("RGB"))

    def torchvision_tensor(path: Path):
        return tensor(tvio.decode_image(tvio.read_file(str(path)), mode=tvio.ImageReadMode.RGB))

    return {"finetune": ours, "torchvision (PIL)": torchvision_pil, "torchvision v2 (tensor)": torchvision_tensor}


def measure(paths: list[Path], kind: str, size: int, rounds: int) -> dict:
    from finetune.data import ImageDataset

    print(f"{kind} pipeline, {size} px, images/s:", file=sys.stderr)
    fns = pipelines(kind, size)
    dataset = ImageDataset([(p, 0) for p in paths], fns["finetune"], seed=0)
    epoch = {"n": 0}

    def ours() -> float:
        dataset.set_epoch(epoch["n"])
        epoch["n"] += 1
        start = time.perf_counter()
        for i in range(len(dataset)):
            out, _ = dataset[i]
        assert out.shape == (3, size, size)
        return len(dataset) / (time.perf_counter() - start)

    def theirs(fn: Callable) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for path in paths:
                out = fn(path)
            assert tuple(out.shape) == (3, size, size)
            return len(paths) / (time.perf_counter() - start)
        return run

    variants = {"finetune": ours, **{k: theirs(v) for k, v in fns.items() if k != "finetune"}}
    speeds = _common.interleave(variants, rounds=rounds, warmup=1)
    return {
        "images_per_s": {k: _common.spread(v) for k, v in speeds.items()},
        "ratio_vs_torchvision_pil": _common.spread(
            _common.paired_ratios(speeds["finetune"], speeds["torchvision (PIL)"])),
        "ratio_vs_torchvision_tensor": _common.spread(
            _common.paired_ratios(speeds["finetune"], speeds["torchvision v2 (tensor)"])),
        "raw_images_per_s": speeds,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=48, help="synthetic JPEG photos")
    p.add_argument("--digits-per-class", type=int, default=20, help="digits PNGs per class")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--digits", type=Path, help="an existing digits folder (default: written to a temp dir)")
    p.add_argument("--dataset", type=Path,
                   help="take the photos from this folder's JPEGs (e.g. make_dataset.py's bird225/train: sizes "
                        "224-500 px, a few EXIF-rotated) instead of writing synthetic 500x375 ones")
    args = p.parse_args(argv)
    if args.tiny:
        args.photos, args.digits_per_class, args.rounds = 4, 2, 1
    import cv2
    import torch

    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    wall = time.perf_counter()
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for TorchCodec)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
            results = run_cases(args)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    wall = time.perf_counter() - wall
    report(args, results, argv, wall)
    return results


def run_cases(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        photos = (dataset_photos(args.dataset, args.photos) if args.dataset
                  else write_photos(work / "photos", args.photos, (500, 375)))
        kind = "benchmark-folder JPEG photo" if args.dataset else "500x375 JPEG photo"
        digits = _common.digits_folder(work, source=args.digits)
        digit_paths = [path for class_dir in sorted(p for p in Path(digits).iterdir() if p.is_dir())
                       for path in sorted(class_dir.iterdir())[:args.digits_per_class]]
        cases = {
            f"{kind}, train (RandomResizedCrop 224 + flip)": (photos, "train", 224),
            f"{kind}, eval (resize 256 + centre crop 224)": (photos, "eval", 224),
            "32x32 greyscale PNG digit, quickstart train (Resize 64 + Affine)": (digit_paths, "quickstart", 64),
        }
        return {name: measure(paths, kind, size, args.rounds) for name, (paths, kind, size) in cases.items()}


def report(args, results: dict, argv, wall: float) -> None:
    rows, summary = [], []
    for name, r in results.items():
        ips = r["images_per_s"]
        rows.append([name, ips["finetune"]["median"], ips["torchvision (PIL)"]["median"],
                     ips["torchvision v2 (tensor)"]["median"], r["ratio_vs_torchvision_pil"]["median"],
                     r["ratio_vs_torchvision_tensor"]["median"]])
        summary.append(f"{name}: finetune {ips['finetune']['median']:.0f} img/s = "
                       f"{r['ratio_vs_torchvision_pil']['median']:.2f}x torchvision (PIL), "
                       f"{r['ratio_vs_torchvision_tensor']['median']:.2f}x torchvision v2 (tensor).")
    tables = [_common.table(
        f"Images/s on one core (median of {args.rounds} interleaved rounds); ratios = finetune / other, "
        "median of per-round ratios.",
        ["images, pipeline", "finetune", "torchvision (PIL)", "torchvision v2 (tensor)", "vs PIL", "vs v2"], rows)]
    notes = [
        "OpenCV's bicubic resize does not antialias when shrinking; Pillow's and torchvision v2's "
        "(antialias=True) do, which costs more and looks smoother: the pipelines are equivalent in geometry, "
        "not bit for bit.",
        "finetune's path includes what ImageDataset adds per sample: the alpha/16-bit/EXIF-aware decode and "
        "re-seeding the pipeline from (seed, epoch, index).",
    ]
    _common.write_result(
        args.out, "data", title="Data pipeline: finetune (albumentations) vs torchvision",
        command=_common.command_line("bench_data.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"photos": args.photos, "dataset": str(args.dataset) if args.dataset else None, "digits_per_class": args.digits_per_class, "rounds": args.rounds,
                  "threads": 1, "tiny": args.tiny},
        summary=summary, tables=tables, notes=notes, results=results,
    )


if __name__ == "__main__":
    main()
