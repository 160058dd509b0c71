"""The decoded-pixel store (``data.store``): every image decoded once, resized to what the pipeline's first op
needs, and kept as raw uint8 pixels in one memory-mapped file, so epochs, stages, runs and DDP ranks read
slices instead of decoding JPEGs.

**What is stored** (:func:`store_plan`, from the pipeline itself):

* a first op that is a deterministic resize (``Resize``, ``SmallestMaxSize``, ``LongestMaxSize``, with
  ``p: 1``; the default eval pipeline starts with one) is *applied by the store*, exactly as the pipeline
  would, and left out of the pipeline the samples then go through: predictions from the store equal those
  from the files;
* before a ``RandomResizedCrop`` (the default train pipeline) the store keeps the image with its shorter side
  shrunk to ``ceil(RRC_HEADROOM × the crop's longer side)`` (1.25: 280 px for a 224 crop), never upscaled. The
  crop is chosen as a fraction of the image, so the geometry is unchanged; 1.25× leaves a full-area crop a
  downscale, as from the original, and the small crops (8 % of the area is 28 % of the side) read from 79 px
  of source instead of from the photo: the FFCV trade, at its 256-350 px;
* ``data.store: N`` shrinks every split's images to a shorter side of N px whatever the first op (what
  ``data.resize_cache: N`` did);
* any other first op (``RandomCrop`` of the photo, a rotation...) reads the files under ``auto``: shrinking
  would change what such an op sees.

**Layout.** ``cache_root()/store/<settings>/<items>/`` (:func:`~finetune._io.cache_path`) with
``pixels.bin`` (every image's bytes, one after the other), ``index.npy`` (offset, length, height, width and
codec per image, in the order of the items), ``sources.json`` (each source's path, size and modification
time) and ``meta.json``. ``<settings>`` hashes the plan, ``max_pixels``, the format version and the OpenCV and
albumentations versions; ``<items>`` the items' paths, sizes and modification times (ns), as the scan cache
stamps files. A store is built in a temporary folder and renamed into place, so a reader never sees one
half-written (a process killed during the build leaves only its temporary folder, removed by the next build),
and two processes building at once each finish theirs and the second rename loses harmlessly. Building a
store for changed items copies every unchanged image's bytes from the newest store of the same settings and
decodes only the new or changed files. The two newest stores of each settings folder are kept.

**Codec.** Raw pixels while the whole store fits its budget (``data.store_budget``, and half the free disk of
the cache), else each image as JPEG quality 95 without chroma subsampling (4:4:4) in the same file, said in
one line: workers then decode a small JPEG instead of the photo.

Unreadable files are counted once, when the store is built (one warning); the dataset skips them silently
afterwards, as it skips them when it reads files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from finetune._io import atomic_write_text, cache_path, fsync_dir, make_temp_dir
from finetune.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, _decode, read_file
from finetune.errors import FinetuneError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when what a store holds changes (filters, layout), so old stores are not read."""
RRC_HEADROOM = 1.25
"""Shorter side stored before a ``RandomResizedCrop``, as a multiple of the crop's longer side."""
JPEG_QUALITY = 95
KEEP = 2
"""Stores kept per settings folder (the newest), so a run reading the previous one is not cut off."""

RAW, JPEG, BAD = 0, 1, 255
_INDEX = np.dtype([("offset", "<u8"), ("length", "<u8"), ("height", "<u4"), ("width", "<u4"), ("codec", "u1")])
_EXACT = (A.Resize, A.SmallestMaxSize, A.LongestMaxSize)


@dataclass(frozen=True)
class StorePlan:
    """What a store holds: the pipeline's first op applied (``op``, its repr), or the shorter side shrunk to
    ``size`` (INTER_AREA, never upscaled)."""

    op: str | None = None
    size: int | None = None

    def describe(self) -> str:
        return f"first op {self.op}" if self.op else f"shorter side {self.size} px"


def store_plan(pipeline, setting: str | int | None) -> tuple[StorePlan | None, object, str]:
    """How a store serves ``pipeline`` under ``setting`` (``data.store``: ``"auto"``, ``"off"`` or N px).

    Returns:
        ``(plan, pipeline to run on the stored pixels, why)``: ``plan`` is None when the pipeline reads the
        files (``why`` says why). With an applied first op, the returned pipeline is ``pipeline`` without it
        (its ``batch_normalize`` kept).
    """
    if setting in (None, "off", False):
        return None, pipeline, "data.store is off"
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 8:
            raise FinetuneError(f"data.store must be auto, off or a shorter side of at least 8 px, got {setting}")
        return StorePlan(size=setting), pipeline, f"data.store: {setting}"
    steps = list(getattr(pipeline, "transforms", []))
    first = steps[0] if steps else None
    if isinstance(first, _EXACT) and first.p == 1:
        rest = A.Compose(steps[1:])
        if hasattr(pipeline, "batch_normalize"):
            rest.batch_normalize = pipeline.batch_normalize
        return StorePlan(op=repr(first)), rest, "the store applies the first op"
    if isinstance(first, A.RandomResizedCrop):
        return StorePlan(size=math.ceil(RRC_HEADROOM * max(first.size))), pipeline, "RandomResizedCrop headroom"
    name = type(first).__name__ if first is not None else "no op"
    return None, pipeline, f"the pipeline starts with {name}, which must see the whole image"


class PixelStore:
    """A built store (:func:`build_store`): ``store[i]`` is image ``i`` as H×W×3 uint8 RGB, or None when its
    file could not be read. The memory map opens on first use in each process (DataLoader workers)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = np.load(self.folder / "index.npy")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def bad(self) -> int:
        return int((self.index["codec"] == BAD).sum())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, i: int) -> np.ndarray | None:
        offset, length, height, width, codec = self.index[i].tolist()
        if codec == BAD:
            return None
        if self._pixels is None:
            size = (self.folder / "pixels.bin").stat().st_size
            self._pixels = np.memmap(self.folder / "pixels.bin", np.uint8, "r") if size else np.zeros(0, np.uint8)
        data = self._pixels[offset:offset + length]
        if codec == RAW:
            return np.array(data).reshape(height, width, 3)
        return cv2.cvtColor(cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def build_store(items: Sequence[tuple[str | os.PathLike, int]], plan: StorePlan, *,
                cache_dir: str | os.PathLike | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                workers: int = 0, budget: int | None = None) -> PixelStore:
    """The store of ``items`` under ``plan``: reused when it exists, else built (in parallel, atomically).

    Args:
        items: (image path, label) pairs, e.g. `Manifest.items`; the store's order.
        plan: What to store (:func:`store_plan`).
        cache_dir: The cache root (``training.cache_dir``); None for the default.
        max_pixels: Largest width × height decoded, as in `load_image`.
        workers: Threads decoding and resizing (OpenCV and Pillow release the GIL); 0 decodes here.
        budget: Most bytes of raw pixels (beyond it: JPEG q95 4:4:4); None: half the free disk only.

    Raises:
        FinetuneError: the cache folder cannot be written.
    """
    paths = [Path(os.path.abspath(p)) for p, _ in items]
    stamps = [_stamp(p) for p in paths]
    settings = json.dumps({"version": FORMAT_VERSION, "op": plan.op, "size": plan.size, "max_pixels": max_pixels,
                           "opencv": cv2.__version__, "albumentations": A.__version__}, sort_keys=True)
    group = cache_path("store", cache_dir) / hashlib.sha256(settings.encode()).hexdigest()[:16]
    key = hashlib.sha256("\n".join(f"{p}\0{s}" for p, s in zip(paths, stamps)).encode()).hexdigest()[:24]
    folder = group / key
    if (folder / "meta.json").exists():
        os.utime(folder / "meta.json")
        return PixelStore(folder)
    try:
        group.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(group)
        tmp = make_temp_dir(group, prefix=f".{key}.tmp-{os.getpid()}-")
    except OSError as e:
        raise FinetuneError(f"cannot create the pixel store in {group}: {e.strerror or e}") from e
    start = time.monotonic()
    try:
        counts = _write(tmp, paths, stamps, plan, group, max_pixels=max_pixels, workers=workers,
                        budget=_budget(group, paths, plan, budget))
        atomic_write_text(tmp / "meta.json", json.dumps({"settings": json.loads(settings), **counts}, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").exists():  # not another process's store: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published the same store first
        fsync_dir(group)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FinetuneError(f"cannot write the pixel store {folder}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store = PixelStore(folder)
    if counts["unreadable"]:
        logger.warning("pixel store: %d of %d images could not be read and are skipped (first: %s)",
                       counts["unreadable"], len(paths), counts["first_unreadable"])
    logger.info("pixel store %s (%s, %s): %d images, %d decoded, %d reused, %.1f MB in %.1fs", folder, plan.describe(),
                counts["codec"], len(paths), counts["decoded"], counts["reused"], counts["bytes"] / 1e6,
                time.monotonic() - start)
    _evict(group, keep=folder)
    return store


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _budget(group: Path, paths: list[Path], plan: StorePlan, budget: int | None) -> bool:
    """Whether the store may hold raw pixels: the images' sizes (from their headers) once resized, against
    ``budget`` and half the free disk of the cache. Returns True for raw."""
    total = 0
    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # unreadable here: the build counts it
            continue
        total += 3 * math.prod(_planned_size(height, width, plan))
    disk = shutil.disk_usage(group).free // 2
    limit = min(disk, budget) if budget is not None else disk
    if total > limit:
        logger.warning("pixel store: %.1f GB of raw pixels exceed its budget of %.1f GB (%s): storing JPEG q%d 4:4:4",
                       total / 1e9, limit / 1e9, "data.store_budget" if budget is not None and budget <= disk
                       else "half the free disk", JPEG_QUALITY)
        return False
    return True


def _planned_size(height: int, width: int, plan: StorePlan) -> tuple[int, int]:
    if plan.size is not None:
        short = min(height, width)
        scale = min(1.0, plan.size / short) if short else 1.0
        return max(1, round(height * scale)), max(1, round(width * scale))
    return _apply_op(plan.op, None, (height, width))


def _apply_op(op: str, image: np.ndarray | None, full: tuple[int, int] | None = None):
    """Apply the stored first op (``op`` is its repr) to ``image``; with ``full``, only the size it would
    give an image of that (height, width)."""
    transform = _op_from_repr(op)
    if full is not None:
        height, width = full
        if isinstance(transform, A.Resize):
            return transform.height, transform.width
        size = transform.max_size if isinstance(transform.max_size, int) else (transform.max_size or [None])[0]
        if size is None:  # max_size_hw: an estimate is enough for the budget
            return height, width
        side = min(height, width) if isinstance(transform, A.SmallestMaxSize) else max(height, width)
        return max(1, round(height * size / side)), max(1, round(width * size / side))
    return transform(image=image)["image"]


_OPS: dict[str, A.BasicTransform] = {}


def _op_from_repr(op: str) -> A.BasicTransform:
    """The albumentations op a plan's repr names (``eval`` of albumentations' own repr, names limited to it)."""
    if op not in _OPS:
        namespace = {name: getattr(A, name) for name in ("Resize", "SmallestMaxSize", "LongestMaxSize")}
        _OPS[op] = eval(op, {"__builtins__": {}}, namespace)  # noqa: S307 - a repr this module wrote
    return _OPS[op]


def _write(tmp: Path, paths: list[Path], stamps: list[str], plan: StorePlan, group: Path, *, max_pixels: int,
           workers: int, budget: bool) -> dict:
    """Fill ``tmp`` with pixels.bin, index.npy and sources.json; reuse unchanged images from the newest store."""
    reuse = _previous(group)
    index = np.zeros(len(paths), _INDEX)
    decoded = reused = unreadable = 0
    first_unreadable = None
    codec_name = "raw" if budget else f"jpeg q{JPEG_QUALITY} 4:4:4"

    def make(i: int) -> tuple[bytes, int, int, int] | str:
        found = reuse.get((str(paths[i]), stamps[i]))
        if found is not None:
            return found
        try:
            image = _stored_image(paths[i], plan, max_pixels)
        except ImageDecodeError as e:
            return str(e)
        return _encode(image, raw=budget) + (False,)

    offset = 0
    chunk = max(64, 16 * max(workers, 1))
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        with open(tmp / "pixels.bin", "wb") as out:
            for begin in range(0, len(paths), chunk):
                block = range(begin, min(begin + chunk, len(paths)))
                results = list(pool.map(make, block)) if pool else [make(i) for i in block]
                for i, result in zip(block, results):
                    if isinstance(result, str):
                        index[i] = (0, 0, 0, 0, BAD)
                        unreadable += 1
                        first_unreadable = first_unreadable or result
                        continue
                    data, height, width, codec, was_reused = result
                    out.write(data)
                    index[i] = (offset, len(data), height, width, codec)
                    offset += len(data)
                    reused += was_reused
                    decoded += not was_reused
            out.flush()
            os.fsync(out.fileno())
    finally:
        if pool is not None:
            pool.shutdown()
    np.save(tmp / "index.npy", index)
    (tmp / "sources.json").write_text(json.dumps([[str(p), s] for p, s in zip(paths, stamps)]))
    return {"codec": codec_name, "images": len(paths), "decoded": decoded, "reused": reused,
            "unreadable": unreadable, "first_unreadable": first_unreadable, "bytes": offset}


def _stored_image(path: Path, plan: StorePlan, max_pixels: int) -> np.ndarray:
    """What the store keeps of ``path``: decoded by `load_image`'s decoder, then resized by the plan."""
    if plan.size is not None:
        image, _, full = _decode(read_file(path), path, max_pixels, plan.size)
        return shrink(image, plan.size, full)
    image, _, _ = _decode(read_file(path), path, max_pixels, None)
    return np.ascontiguousarray(_apply_op(plan.op, image))


def _encode(image: np.ndarray, *, raw: bool) -> tuple[bytes, int, int, int]:
    height, width = image.shape[:2]
    if raw:
        return np.ascontiguousarray(image, dtype=np.uint8).tobytes(), height, width, RAW
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
                             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise FinetuneError("OpenCV could not encode a JPEG for the pixel store")
    return data.tobytes(), height, width, JPEG


def _previous(group: Path) -> dict[tuple[str, str], tuple[bytes, int, int, int, bool]]:
    """(path, stamp) → the bytes of that image in the newest complete store of ``group``, read lazily."""
    stores = sorted((f for f in group.iterdir() if (f / "meta.json").exists()),
                    key=lambda f: (f / "meta.json").stat().st_mtime, reverse=True)
    if not stores:
        return {}
    newest = stores[0]
    try:
        sources = json.loads((newest / "sources.json").read_text())
        index = np.load(newest / "index.npy")
        pixels = np.memmap(newest / "pixels.bin", np.uint8, "r") if (newest / "pixels.bin").stat().st_size else None
    except (OSError, ValueError):
        return {}
    return _Reused(sources, index, pixels)


class _Reused(dict):
    """A mapping (path, stamp) → an image's stored bytes in an earlier store, read on lookup."""

    def __init__(self, sources, index, pixels):
        super().__init__()
        self._rows = {(path, stamp): i for i, (path, stamp) in enumerate(sources)}
        self._index, self._pixels = index, pixels

    def get(self, key, default=None):
        i = self._rows.get(key)
        if i is None or self._index[i]["codec"] == BAD or self._pixels is None:
            return default
        offset, length, height, width, codec = self._index[i].tolist()
        return bytes(self._pixels[offset:offset + length]), height, width, codec, True


def _remove_abandoned(group: Path) -> None:
    """Delete temporary folders of builds whose process is gone (killed mid-build)."""
    for tmp in group.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _evict(group: Path, keep: Path) -> None:
    stores = sorted((f for f in group.iterdir() if (f / "meta.json").exists() and f != keep),
                    key=lambda f: (f / "meta.json").stat().st_mtime, reverse=True)
    for old in stores[KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def shrink(image: np.ndarray, size: int, full: tuple[int, int] | None = None) -> np.ndarray:
    """``image`` with its shorter side brought down to ``size`` (INTER_AREA); unchanged if not longer. The
    output size is computed from ``full`` (height, width) when the image was decoded at a reduced scale,
    so it does not depend on the reduction."""
    height, width = full or image.shape[:2]
    short = min(height, width)
    if short <= size:
        return image
    # INTER_AREA averages the source pixels under each output pixel (antialiased). Shrinking a 4000×3000
    # photo took it 23 ms, against 54 ms for Pillow's LANCZOS with reducing_gap=3 and 106 ms for LANCZOS.
    if width == short:
        new_size = (size, round(height * size / width))
    else:
        new_size = (round(width * size / height), size)
    return cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)
