"""Dataset cards: YAML files in the repository's ``datasets/`` folder (shipped in the package as
``finetune/cards/``) describing a known dataset.

A card states the layout, the split protocol (which `prepare_manifest` uses as defaults), the excluded
classes, the expected class count, the image size, where to obtain the data and published reference
accuracies. `DatasetCard` is the schema; every key is checked when a card is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
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
