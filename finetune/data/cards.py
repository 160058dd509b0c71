"""Known datasets: dataset cards and the embedded digits sample.

Dataset cards: YAML files in the repository's ``datasets/`` folder (shipped in the package as
``finetune/cards/``) describing a known dataset.

A card states the layout, the split protocol (which `prepare_manifest` uses as defaults), the excluded
classes, the expected class count, the image size, where to obtain the data and published reference
accuracies. `DatasetCard` is the schema; every key is checked when a card is loaded.

The embedded sample dataset: scikit-learn's bundled digits written as a class-folder PNG dataset.

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
from typing import Literal, Optional

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.errors import FinetuneError

def _cards_dir() -> Path:
    """``finetune/cards/`` in an installed package (setup.py ships ``datasets/`` there), else the ``datasets/``
    folder of the source checkout the package is imported from."""
    package = Path(__file__).resolve().parents[1]  # finetune/ (`import finetune` would close a cycle)
    installed = package / "cards"
    return installed if installed.is_dir() else package.parent / "datasets"


CARDS_DIR = _cards_dir()
"""Where the shipped cards are: the repository's ``datasets/``, installed as ``finetune/cards/``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitProtocol(_Strict):
    """How a one-folder dataset is split; None leaves `prepare_manifest`'s default."""

    val: Optional[float] = Field(None, ge=0, lt=1)
    test: Optional[float] = Field(None, ge=0, lt=1)
    train_per_class: Optional[int] = Field(None, ge=1)
    exclude: list[str] = []


class Source(_Strict):
    """Where a user obtains the dataset."""

    url: str
    notes: str = ""


class Reference(_Strict):
    """A published accuracy on this dataset."""

    model: str
    head: str
    accuracy: float = Field(ge=0, le=100)
    split: str = "test"
    source: str
    notes: str = ""


class DatasetCard(_Strict):
    """Schema of a dataset card."""

    name: str
    title: str
    layout: Literal["pre-split", "folder"]
    folder: Optional[str] = None
    split: SplitProtocol = SplitProtocol()
    num_classes: int = Field(ge=2)
    image_size: Optional[tuple[int, int]] = None
    source: Source
    references: list[Reference] = []
    notes: str = ""


def list_cards() -> list[str]:
    """Names of the cards shipped in ``datasets/``."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name_or_path: str | os.PathLike) -> dict:
    """Load and validate a dataset card.

    Args:
        name_or_path: A card name (``"caltech101"`` reads ``datasets/caltech101.yaml``) or a YAML file.

    Returns:
        The card as a plain dict with every `DatasetCard` key (absent optional keys filled with their
        defaults): ``name``, ``title``, ``layout`` (``"pre-split"`` or ``"folder"``), ``folder`` (the
        folder of a download holding the class folders, which is the root to give, or None), ``split`` (``val``, ``test``,
        ``train_per_class``, ``exclude``), ``num_classes``, ``image_size`` ((H, W) or None when sizes
        vary), ``source`` (``url``, ``notes``), ``references`` (``model``, ``head``, ``accuracy``,
        ``split``, ``source``, ``notes``) and ``notes``.

    Raises:
        FinetuneError: No such card (the message lists the known ones), or the card is invalid (the
            message names the key).
    """
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) or os.sep in text else CARDS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise FinetuneError(f"unknown dataset card {text!r}; known cards: {', '.join(list_cards()) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return DatasetCard.model_validate(data).model_dump()
    except yaml.YAMLError as e:
        raise FinetuneError(f"dataset card {path}: invalid YAML: {' '.join(str(e).split())}") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise FinetuneError(f"dataset card {path}: {where}: {first['msg']}") from e


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
    from sklearn.datasets import load_digits  # lazy: start-up (about 1 s); only the digits sample needs it

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
