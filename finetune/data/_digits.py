"""The embedded sample dataset: scikit-learn's bundled digits written as a class-folder PNG dataset.

scikit-learn ships 1,797 real 8×8 greyscale scans of handwritten digits (values 0-16, 10 classes, about
180 per class) inside the package, so this works offline. Each image is scaled to 0-255 (ink bright on a
black background, as in MNIST), upscaled to ``size``×``size`` with bilinear interpolation (smooth strokes,
no ringing), and saved as an 8-bit greyscale PNG: ``OUT/<digit>/<index>.png`` with the index into
``load_digits()`` zero-padded to four digits. It is one folder of class folders, split with a seed like
any other (see the ``digits`` dataset card).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.errors import FinetuneError

_MARKER = ".finetune-digits.json"


def write_digits(out_dir: str | os.PathLike, *, size: int = 32) -> Path:
    """Write the digits dataset to ``out_dir`` unless it already holds it at this size.

    The dataset is built in a temporary folder next to ``out_dir`` and renamed into place, so
    ``out_dir`` is either absent or complete. A hidden marker file records the size.

    Args:
        out_dir: Folder to create (it may exist if empty).
        size: Side of the square PNGs in pixels (at least 8).

    Returns:
        ``out_dir``.

    Raises:
        FinetuneError: ``size`` below 8, or ``out_dir`` holds something else (another size, other files).
    """
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir).absolute()
    if size < 8:
        raise FinetuneError(f"digits size must be at least 8 (the originals are 8×8), got {size}")
    marker = out_dir / _MARKER
    if marker.is_file():
        built = json.loads(marker.read_text())["size"]
        if built == size:
            return out_dir
        raise FinetuneError(f"{out_dir} holds the digits at {built}×{built}; remove it or choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FinetuneError(f"{out_dir} exists and is not an empty folder")

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        for index, (image, target) in enumerate(zip(pixels, digits.target)):
            folder = tmp / str(target)
            folder.mkdir(exist_ok=True)
            Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{index:04d}.png")
        (tmp / _MARKER).write_text(json.dumps({"size": size}) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

