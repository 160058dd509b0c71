"""Image decoding: Pillow vs OpenCV (``cv2.imdecode``) per format and size, and finetune's ``decode_image``.

    python benchmarks/bench_decode.py          # JPEG and PNG photos at 256/512/1024 px, digits PNGs
    python benchmarks/bench_decode.py --tiny   # seconds; the smoke test

Every decoder goes from the file's bytes in memory to an HxWx3 uint8 RGB array (file reading is the same
for all and left out):

* ``Pillow``: ``np.asarray(Image.open(BytesIO(data)).convert("RGB"))``.
* ``OpenCV``: ``cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)`` (or IMREAD_COLOR + cvtColor on older OpenCV).
* ``finetune``: ``finetune.data.decode_image``, what ``load_image`` runs today: Pillow plus the size check,
  EXIF transpose and mode handling.

Images are synthetic photos (smooth colour fields, sharp shapes, noise), square, JPEG quality 90 and
PNG (default compression), plus the digits sample's 32x32 greyscale PNGs. Rounds (each decoder over the
same images) are interleaved; the verdict per format is the median ratio Pillow time / OpenCV time.
"""
from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

import _common


def encode(images: list[np.ndarray], fmt: str) -> list[bytes]:
    from PIL import Image

    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    import cv2
    from PIL import Image

    from finetune.data import decode_image

    def pillow(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    if hasattr(cv2, "IMREAD_COLOR_RGB"):
        def opencv(data: bytes) -> np.ndarray:
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    else:  # OpenCV < 4.10
        def opencv(data: bytes) -> np.ndarray:
            return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    return {"Pillow": pillow, "OpenCV": opencv, "finetune decode_image": lambda data: decode_image(data, "bench")[0]}


def measure(name: str, blobs: list[bytes], repeat: int, rounds: int) -> dict:
    print(f"{name}, ms per image:", file=sys.stderr)
    fns = decoders()

    def timed(fn: Callable) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for _ in range(repeat):
                for data in blobs:
                    fn(data)
            return (time.perf_counter() - start) / (repeat * len(blobs)) * 1e3  # ms per image
        return run

    ms = _common.interleave({name: timed(fn) for name, fn in fns.items()}, rounds=rounds, warmup=1)
    ref = fns["Pillow"](blobs[0])
    diff = int(np.abs(ref.astype(np.int16) - fns["OpenCV"](blobs[0]).astype(np.int16)).max())
    return {
        "ms_per_image": {k: _common.spread(v) for k, v in ms.items()},
        "pillow_over_opencv": _common.spread(_common.paired_ratios(ms["Pillow"], ms["OpenCV"])),
        "finetune_over_pillow": _common.spread(_common.paired_ratios(ms["finetune decode_image"], ms["Pillow"])),
        "finetune_over_opencv": _common.spread(_common.paired_ratios(ms["finetune decode_image"], ms["OpenCV"])),
        "max_abs_pixel_difference": diff,
        "raw_ms_per_image": ms,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="photo sides (px)")
    p.add_argument("--images", type=int, default=4, help="distinct images per case")
    p.add_argument("--pixels-per-round", type=float, default=8e6,
                   help="decoded pixels per round and decoder (sets how often each image is decoded)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--digits", type=Path, help="an existing digits folder (default: written to a temp dir)")
    p.add_argument("--dataset", type=Path,
                   help="also decode 16 JPEGs of this folder (e.g. make_dataset.py's bird225/train)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.images, args.pixels_per_round, args.rounds = [64], 2, 2e4, 1
    import cv2

    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    wall = time.perf_counter()
    try:
        results = run_cases(args)
    finally:
        cv2.setNumThreads(cv2_threads)
    wall = time.perf_counter() - wall
    report(args, results, argv, wall)
    return results


def run_cases(args) -> dict:
    cases: dict[str, tuple[str, int, list[bytes]]] = {}
    for fmt in ("JPEG", "PNG"):
        for size in args.sizes:
            photos = [_common.synthetic_photo(size, size, seed=i) for i in range(args.images)]
            cases[f"{fmt} {size}x{size} photo"] = (fmt, size * size, encode(photos, fmt))
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        digits = _common.digits_folder(Path(tmp), source=args.digits)
        files = sorted(Path(digits).glob("*/*.png"))[:: max(1, 1797 // 64)][: max(args.images, 16)]
        cases["PNG 32x32 greyscale digit"] = ("PNG", 32 * 32, [f.read_bytes() for f in files])
    if args.dataset:
        from bench_data import dataset_photos

        blobs = [f.read_bytes() for f in dataset_photos(args.dataset, 16)]
        cases["JPEG benchmark-folder photo"] = ("JPEG", 400 * 300, blobs)

    results = {}
    for name, (fmt, pixels, blobs) in cases.items():
        repeat = max(1, int(args.pixels_per_round / (pixels * len(blobs))))
        results[name] = {"format": fmt, "bytes_mean": int(np.mean([len(b) for b in blobs])),
                         **measure(name, blobs, repeat, args.rounds)}
    return results


def report(args, results: dict, argv, wall: float) -> None:
    rows, verdicts = [], {}
    for name, r in results.items():
        ms = r["ms_per_image"]
        ratio = r["pillow_over_opencv"]["median"]
        rows.append([name, r["bytes_mean"], ms["Pillow"]["median"], ms["OpenCV"]["median"],
                     ms["finetune decode_image"]["median"], f"{ratio:.2f}x",
                     "OpenCV" if ratio > 1 else "Pillow", r["max_abs_pixel_difference"]])
        verdicts.setdefault(r["format"], []).append((name, ratio))
    summary = []
    for fmt, items in verdicts.items():
        photo = [ratio for name, ratio in items if "photo" in name]
        ratios = ", ".join(f"{name.split()[1]} {ratio:.2f}x" for name, ratio in items)
        winner = "OpenCV" if all(ratio > 1 for ratio in photo) else "Pillow" if all(ratio < 1 for ratio in photo) \
            else "neither consistently"
        summary.append(f"{fmt}: faster decoder for photos: {winner} (Pillow time / OpenCV time: {ratios}).")
    fin = ", ".join(f"{name.split()[0]} {name.split()[1]} {r['finetune_over_pillow']['median']:.2f}x / "
                    f"{r['finetune_over_opencv']['median']:.2f}x" for name, r in results.items())
    summary.append(f"finetune's decode_image (what load_image runs), time relative to Pillow / OpenCV: {fin}.")
    tables = [_common.table(
        f"Milliseconds per image (median of {args.rounds} interleaved rounds); ratio = median of per-round "
        "Pillow/OpenCV times (> 1: OpenCV faster); max diff = largest per-pixel difference of the two "
        "decodes of the first image.",
        ["image", "bytes", "Pillow ms", "OpenCV ms", "finetune ms", "Pillow/OpenCV", "faster", "max diff"], rows)]
    notes = [
        "OpenCV alone is not a drop-in for load_image: IMREAD_COLOR drops alpha (finetune composites onto "
        "white), maps 16-bit to 8-bit by >> 8 (finetune: // 257), ignores palette transparency, and decodes "
        "before any pixel-count check (finetune checks Pillow's header first; OpenCV's own limit is "
        "CV_IO_MAX_IMAGE_PIXELS). OpenCV applies EXIF orientation for JPEG by default.",
        "One thread for OpenCV (cv2.setNumThreads(1)), as in a DataLoader worker; Pillow decodes on one.",
    ]
    _common.write_result(
        args.out, "decode", title="Decoding: Pillow vs OpenCV",
        command=_common.command_line("bench_decode.py", argv), tiny=args.tiny, wall_s=wall,
        settings={"dataset": str(args.dataset) if args.dataset else None, "sizes": args.sizes, "images": args.images, "pixels_per_round": args.pixels_per_round,
                  "rounds": args.rounds, "jpeg_quality": 90, "tiny": args.tiny},
        summary=summary, tables=tables, notes=notes, results=results,
    )


if __name__ == "__main__":
    main()
