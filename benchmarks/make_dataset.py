"""A benchmark dataset of real shape: a Bird-225-shaped pre-split folder and a Caltech-101-shaped one-folder one.

    python benchmarks/make_dataset.py /data/bench             # 225 classes, ~120 train images each (~30k JPEGs)
    python benchmarks/make_dataset.py /data/bench --tiny      # 4 classes, a few images each: seconds

Writes, under the folder given (generated, never committed; the same ``--seed`` gives the same bytes):

* ``bird225/{train,valid,test}/BIRD 001 ...``: pre-split like Bird-225 (upper-case class names with a
  space, 5 validation and 5 test images per class, a varying number of training images per class).
* ``101_ObjectCategories/class_001 ... + BACKGROUND_Google``: one folder of class folders like
  Caltech-101 (31 to a few hundred images per class at full size), for finetune's seeded split.
* ``dataset.json``: what was generated: counts, the special files and the planted bad files.

Images are photo-like JPEGs (quality 80-95, 4:2:0): a smooth colour field, 1/f ("pink") luminance texture
with a class-dependent orientation, a class-coloured object of a class-dependent shape at a random place
and scale, a few distractor shapes and branch-like edges, defocus blur and sensor noise. Sizes vary: the
shorter side 224-400 px, aspect ratios 1:1 to 3:2 either way, the longer side at most 500 px. A few
images are PNG (one with an alpha channel), greyscale JPEG, or JPEG with an EXIF orientation of 6 (stored
sideways); a few bad files are planted in training folders: truncated JPEGs, empty files and text files
named ``.jpg``.

Every image is drawn from its own seed (dataset seed, variant, class, index), so the output does not depend
on how the work is spread over processes. The generation time goes to ``<out>/results/dataset.json`` and
RESULTS.md like a benchmark's.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

import _common

BIRD = "bird225"
CALTECH = "101_ObjectCategories"
MIN_SIDE, MAX_SHORT_SIDE, MAX_SIDE = 224, 400, 500
ASPECTS = (1.0, 4 / 3, 3 / 2)


# ------------------------------------------------------------------------------------------ the images

def _rng(*key: Any) -> np.random.Generator:
    """A generator seeded by a stable hash of ``key`` (Python's ``hash`` of a str changes per process)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


NOISE_TILE = 512


@functools.lru_cache(maxsize=1)
def _sensor_noise() -> np.ndarray:
    """A fixed tile of unit Gaussian noise, cropped at a random offset per image (drawing 600k normals
    per image took a third of the generation time). Large enough for any image of MAX_SIDE px."""
    return np.random.default_rng(20240101).standard_normal((NOISE_TILE, NOISE_TILE, 3), dtype=np.float32)


def class_style(seed: int, variant: str, label: int) -> dict[str, Any]:
    """What makes a class recognisable: its palette, object shape and colour, and texture orientation."""
    rng = _rng(seed, variant, "class", label)
    return {
        "palette": rng.integers(20, 236, (3, 3)).tolist(),
        "shape": int(rng.integers(0, 4)),  # ellipse, polygon, star, bar
        "colour": rng.integers(0, 256, 3).tolist(),
        "vertices": int(rng.integers(3, 8)),
        "angle": float(rng.uniform(0, np.pi)),
        "anisotropy": float(rng.uniform(0.5, 4.0)),
    }


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): the shorter side 224-400 px, aspect 1:1 to 3:2 either way, longer side <= 500."""
    short = int(rng.integers(MIN_SIDE, MAX_SHORT_SIDE + 1))
    long = min(int(round(short * ASPECTS[int(rng.integers(len(ASPECTS)))])), MAX_SIDE)
    return (short, long) if rng.random() < 0.5 else (long, short)


def pink_noise(height: int, width: int, rng: np.random.Generator, angle: float, anisotropy: float) -> np.ndarray:
    """Zero-mean, unit-std noise whose amplitude spectrum falls as 1/f (natural images' statistics),
    stronger along ``angle``. Made at half resolution and upsampled: the fine scales come from the
    sensor noise and the JPEG anyway."""
    h, w = max(height // 2, 8), max(width // 2, 8)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    direction = np.cos(np.arctan2(fy, fx) - angle) ** 2
    amplitude = (1.0 + anisotropy * direction) / f
    amplitude[0, 0] = 0.0
    phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
    field = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(h, w))
    field = (field - field.mean()) / (field.std() + 1e-8)
    return cv2.resize(field.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def _shape_points(kind: int, vertices: int, centre, radius: float, rotation: float, rng) -> np.ndarray:
    if kind == 2:  # star: alternate outer and inner radii
        angles = rotation + np.arange(2 * vertices) * np.pi / vertices
        radii = np.where(np.arange(2 * vertices) % 2 == 0, radius, radius * 0.45)
    else:  # irregular polygon
        angles = rotation + np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radii = radius * rng.uniform(0.7, 1.0, vertices)
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    return pts.round().astype(np.int32)


def photo(style: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """One photo-like H×W×3 uint8 RGB image of the class ``style``."""
    height, width = image_size(rng)
    palette = np.array(style["palette"], dtype=np.float32)
    # smooth colour field: a coarse grid of palette colours (jittered), bicubic upsampled
    gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    grid = palette[rng.integers(0, 3, (gh, gw))] + rng.normal(0, 18, (gh, gw, 3))
    img = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    # 1/f luminance texture with the class's orientation
    texture = pink_noise(height, width, rng, style["angle"] + rng.normal(0, 0.15), style["anisotropy"])
    img += texture[..., None] * rng.uniform(14, 30)
    short = min(height, width)
    # branch-like edges and distractors
    for _ in range(int(rng.integers(1, 5))):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(img, p0, p1, tuple(float(c) for c in rng.integers(0, 90, 3)), int(rng.integers(2, 9)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(img, centre, int(rng.integers(short // 20, short // 8)),
                   tuple(float(c) for c in rng.integers(0, 256, 3)), -1, cv2.LINE_AA)
    # the class's object: its shape and colour, somewhere, at some scale, with the texture showing through
    radius = short * rng.uniform(0.15, 0.35)
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    rotation = style["angle"] + rng.normal(0, 0.4)
    colour = np.clip(np.array(style["colour"], dtype=np.float32) + rng.normal(0, 15, 3), 0, 255)
    mask = np.zeros((height, width), np.uint8)
    kind = style["shape"]
    if kind == 0:
        axes = (int(radius), int(radius * rng.uniform(0.45, 0.8)))
        cv2.ellipse(mask, (int(centre[0]), int(centre[1])), axes, np.degrees(rotation), 0, 360, 255, -1, cv2.LINE_AA)
    elif kind == 3:
        box = ((centre[0], centre[1]), (radius * 2, radius * 0.5), np.degrees(rotation))
        cv2.fillPoly(mask, [cv2.boxPoints(box).round().astype(np.int32)], 255, cv2.LINE_AA)
    else:
        cv2.fillPoly(mask, [_shape_points(kind, style["vertices"], centre, radius, rotation, rng)], 255, cv2.LINE_AA)
    x, y, w, h = cv2.boundingRect(mask)  # blend only where the object is
    alpha = (mask[y:y + h, x:x + w].astype(np.float32) / 255.0)[..., None]
    shaded = colour + texture[y:y + h, x:x + w, None] * 12.0
    img[y:y + h, x:x + w] = img[y:y + h, x:x + w] * (1 - alpha) + shaded * alpha
    # defocus and sensor noise
    sigma = rng.uniform(0.0, 1.5)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    y0, x0 = int(rng.integers(0, NOISE_TILE - height + 1)), int(rng.integers(0, NOISE_TILE - width + 1))
    img += _sensor_noise()[y0:y0 + height, x0:x0 + width] * np.float32(rng.uniform(2, 6))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, kind: str, rng: np.random.Generator) -> bytes:
    """The file's bytes: ``jpeg``, ``grey`` (greyscale JPEG), ``exif`` (stored sideways with EXIF
    orientation 6, so it reads upright), ``png`` or ``png-alpha``."""
    quality = int(rng.integers(80, 96))
    if kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return buf.tobytes()
    from PIL import Image

    out = io.BytesIO()
    if kind == "grey":
        Image.fromarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)).save(out, "JPEG", quality=quality)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(out, "JPEG", quality=quality, exif=exif)
    elif kind == "png":
        Image.fromarray(rgb).save(out, "PNG", compress_level=1)
    elif kind == "png-alpha":
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[: rgb.shape[0] // 4] = 96
        Image.fromarray(np.dstack([rgb, alpha])).save(out, "PNG", compress_level=1)
    else:
        raise ValueError(kind)
    return out.getvalue()


BAD_KINDS = ("truncated", "empty", "not-an-image")


def bad_bytes(kind: str, rng: np.random.Generator, style: dict[str, Any]) -> bytes:
    if kind == "empty":
        return b""
    if kind == "not-an-image":
        return b"<html><body>403 Forbidden: this was saved as a .jpg by a crawler</body></html>\n"
    data = encode(photo(style, rng), "jpeg", rng)
    return data[: len(data) // 2]  # cut mid-scan: the end-of-image marker is gone


# ---------------------------------------------------------------------------------------------- plan

def plan(dest: Path, *, seed: int, classes: int, per_class: int, eval_per_class: int, caltech_classes: int,
         caltech_per_class: int, specials: int, bad_per_kind: int) -> tuple[list[dict], dict[str, Any]]:
    """Every file to write, as jobs ``{path, variant, label, index, kind}``, and the dataset's description."""
    jobs: list[dict] = []
    description: dict[str, Any] = {}

    def add_variant(variant: str, root: str, layout: str, names: list[str], counts: dict[str, list[int]]):
        items = []
        for split, per_label in counts.items():
            for label, n in enumerate(per_label):
                folder = Path(root, split, names[label]) if split else Path(root, names[label])
                items += [{"path": str(folder / f"{i:04d}"), "variant": variant, "label": label,
                           "index": f"{split}{i}", "kind": "jpeg", "split": split} for i in range(n)]
        rng = _rng(seed, variant, "plan")
        chosen = rng.permutation(len(items))
        kinds = ["png", "png-alpha", "grey", "exif"]
        take = {"png": specials, "png-alpha": 1, "grey": specials, "exif": specials}
        special: dict[str, list[str]] = {k: [] for k in kinds}
        cursor = 0
        for kind in kinds:
            for idx in chosen[cursor: cursor + take[kind]]:
                items[idx]["kind"] = kind
                special[kind].append(items[idx]["path"])
            cursor += take[kind]
        for item in items:
            item["path"] += ".png" if item["kind"].startswith("png") else ".jpg"
        train = [i for i in items if i["split"] in ("train", "")]
        bad = []
        for kind in BAD_KINDS:  # extra files in training class folders, beside the real images
            for n, idx in enumerate(rng.choice(len(train), bad_per_kind, replace=False)):
                folder = Path(train[idx]["path"]).parent
                path = str(folder / f"zz_{kind}_{n}.jpg")
                bad.append({"path": path, "kind": kind})
                items.append({"path": path, "variant": variant, "label": train[idx]["label"],
                              "index": f"bad-{kind}-{n}", "kind": kind, "split": train[idx]["split"]})
        jobs.extend(items)
        rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731 - paths as the data layer lists them
        description[variant] = {
            "root": root, "layout": layout, "classes": len(names),
            "images": {split or "all": sum(c) for split, c in counts.items()},
            "special": {k: sorted(rel(p) + (".png" if k.startswith("png") else ".jpg") for p in v)
                        for k, v in special.items()},
            "bad_files": sorted(({"path": rel(b["path"]), "kind": b["kind"]} for b in bad), key=lambda b: b["path"]),
        }

    rng = _rng(seed, "counts")
    bird_names = [f"BIRD {i + 1:03d}" for i in range(classes)]
    bird_train = [max(1, int(round(per_class * rng.uniform(0.75, 1.35)))) for _ in range(classes)]
    add_variant(BIRD, BIRD, "pre-split", bird_names,
                {"train": bird_train, "valid": [eval_per_class] * classes, "test": [eval_per_class] * classes})
    caltech_names = [f"class_{i + 1:03d}" for i in range(caltech_classes - 1)] + ["BACKGROUND_Google"]
    low = min(31, caltech_per_class)
    caltech_counts = [max(low, int(round(caltech_per_class * rng.lognormal(0, 0.6)))) for _ in caltech_names]
    add_variant("caltech101", CALTECH, "folder", caltech_names, {"": caltech_counts})
    for job in jobs:
        job["path"] = str(dest / job["path"])
    return jobs, description


def write_job(job: dict, seed: int) -> int:
    """Write one planned file; returns its size in bytes."""
    style = class_style(seed, job["variant"], job["label"])
    rng = _rng(seed, job["variant"], job["label"], job["index"])
    if job["kind"] in BAD_KINDS:
        data = bad_bytes(job["kind"], rng, style)
    else:
        data = encode(photo(style, rng), job["kind"], rng)
    path = Path(job["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def _write_chunk(args) -> int:
    jobs, seed = args
    cv2.setNumThreads(1)
    return sum(write_job(job, seed) for job in jobs)


def generate(dest: Path, *, seed: int = 0, classes: int = 225, per_class: int = 120, eval_per_class: int = 5,
             caltech_classes: int = 102, caltech_per_class: int = 60, specials: int = 6, bad_per_kind: int = 2,
             workers: Optional[int] = None) -> dict[str, Any]:
    """Write both variants under ``dest`` (which must not hold them yet) and ``dest/dataset.json``."""
    dest = Path(dest)
    for root in (BIRD, CALTECH):
        if (dest / root).exists():
            raise SystemExit(f"{dest / root} exists: give an empty folder (the generator never overwrites)")
    start = time.perf_counter()
    jobs, description = plan(dest, seed=seed, classes=classes, per_class=per_class, eval_per_class=eval_per_class,
                             caltech_classes=caltech_classes, caltech_per_class=caltech_per_class,
                             specials=specials, bad_per_kind=bad_per_kind)
    from finetune._workers import usable_cpus

    usable = usable_cpus()
    workers = workers or usable
    chunks = [(jobs[i::workers * 8], seed) for i in range(workers * 8)]
    if workers <= 1 or len(jobs) < 2 * workers:
        total_bytes = _write_chunk((jobs, seed))
    else:
        # spawned, not forked: a child forked after OpenCV started its thread pool (any earlier cv2 call in
        # this process, e.g. in a test) can hang for good in cv2.setNumThreads
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            total_bytes = sum(pool.map(_write_chunk, chunks))
    seconds = time.perf_counter() - start
    doc = {
        "seed": seed,
        "settings": {"classes": classes, "per_class": per_class, "eval_per_class": eval_per_class,
                     "caltech_classes": caltech_classes, "caltech_per_class": caltech_per_class,
                     "specials": specials, "bad_per_kind": bad_per_kind},
        "variants": description,
        "files": len(jobs),
        "bytes": total_bytes,
        "seconds": round(seconds, 2),
        "workers": workers,
    }
    (dest / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# ---------------------------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("dest", type=Path, help="folder to write bird225/ and 101_ObjectCategories/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=225, help="Bird-225 classes")
    p.add_argument("--per-class", type=int, default=120, help="mean training images per Bird class (varies ±30%%)")
    p.add_argument("--eval-per-class", type=int, default=5, help="valid/ and test/ images per Bird class")
    p.add_argument("--caltech-classes", type=int, default=102, help="Caltech class folders, BACKGROUND_Google included")
    p.add_argument("--caltech-per-class", type=int, default=60,
                   help="median images per Caltech class (log-normal spread, at least 31)")
    p.add_argument("--workers", type=int, help="processes (default: the CPUs this process may use)")
    args = p.parse_args(argv)
    if args.tiny:
        args.classes, args.per_class, args.eval_per_class = 4, 3, 1
        args.caltech_classes, args.caltech_per_class = 3, 4
    specials = 1 if args.tiny else 6
    print(f"writing the benchmark dataset into {args.dest} ...", file=sys.stderr, flush=True)
    doc = generate(args.dest, seed=args.seed, classes=args.classes, per_class=args.per_class,
                   eval_per_class=args.eval_per_class, caltech_classes=args.caltech_classes,
                   caltech_per_class=args.caltech_per_class, specials=specials, workers=args.workers)
    bird, caltech = doc["variants"][BIRD], doc["variants"]["caltech101"]
    rate = doc["files"] / doc["seconds"]
    summary = [
        f"Bird-225-shaped: {bird['classes']} classes, {bird['images']['train']:,} train / {bird['images']['valid']:,} "
        f"valid / {bird['images']['test']:,} test images; Caltech-shaped: {caltech['classes']} class folders, "
        f"{caltech['images']['all']:,} images; {len(bird['bad_files']) + len(caltech['bad_files'])} planted bad files.",
        f"Generated {doc['files']:,} files ({doc['bytes'] / 1e6:,.0f} MB) in {doc['seconds']:.0f} s on {doc['workers']} "
        f"process(es): {rate:.0f} files/s (seed {doc['seed']}).",
    ]
    full = len(plan(args.dest, seed=args.seed, classes=225, per_class=120, eval_per_class=5, caltech_classes=102,
                    caltech_per_class=60, specials=6, bad_per_kind=2)[0])
    if doc["files"] != full:
        summary.append(f"The default setting (225 classes, ~120 train images each) writes {full:,} files: about "
                       f"{full / rate / 60:.0f} min at this rate on {doc['workers']} process(es).")
    rows = [[name, v["layout"], v["classes"], ", ".join(f"{k} {n:,}" for k, n in v["images"].items()),
             ", ".join(f"{k} {len(p)}" for k, p in v["special"].items()), len(v["bad_files"])]
            for name, v in doc["variants"].items()]
    _common.write_result(
        args.out, "dataset", title="The benchmark dataset (benchmarks/make_dataset.py)",
        command=_common.command_line("make_dataset.py", [a for a in (argv or sys.argv[1:]) if a != str(args.dest)]),
        tiny=args.tiny, wall_s=doc["seconds"],
        settings={**doc["settings"], "seed": doc["seed"], "workers": doc["workers"]},
        summary=summary,
        tables=[_common.table("What was generated (sizes: shorter side 224-400 px, longer side <= 500 px).",
                              ["variant", "layout", "classes", "images", "special files", "bad files"], rows)],
        notes=["Photo-like synthetic images (1/f texture, smooth colour fields, class-coloured shapes, blur, "
               "sensor noise, JPEG 80-95); no real photographs, so accuracies on it say nothing about real data."],
        results={"files": doc["files"], "bytes": doc["bytes"], "seconds": doc["seconds"],
                 "files_per_s": rate, "variants": doc["variants"]},
    )
    return doc


if __name__ == "__main__":
    main()
