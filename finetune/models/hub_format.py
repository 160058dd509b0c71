"""Reading a hub-format model folder (``finetune export --format hub``): the layout timm's Hugging Face Hub
models use, which ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``"hf-hub:OWNER/NAME"`` once pushed) loads, plus what
finetune needs to rebuild its own model from it.

A folder holds:

* ``config.json``: timm's (``timm.models.save_config_for_hf``): ``architecture``, ``num_classes``,
  ``label_names``, ``pretrained_cfg`` (mean, std, input size, crop), and a ``finetune`` entry (head, classes);
* ``model.safetensors``: the weights under timm's own names. A checkpoint with a linear head is a plain timm
  classifier: its head is the timm model's classifier (``fc``, ``classifier``, ``head``...), so timm gives the same
  logits. Any other head (spinal, mlp) is not a timm module: ``model.safetensors`` then holds the backbone alone
  (``num_classes: 0``: timm loads a feature extractor) and ``finetune_head.safetensors`` the head;
* ``checkpoint.json``: the finetune checkpoint description with ``"layout": "hub"``, so every finetune command
  (``predict``, ``eval``, ``explain``, ``export``, ``finetune.load``) reads the folder as a checkpoint;
* ``README.md``: the model card.

Written by :mod:`finetune.deploy.hub`; read here, below the commands that load checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune._io import read_text_file
from finetune.errors import FinetuneError

LAYOUT = "hub"
"""``checkpoint.json``'s ``layout`` in a hub-format folder."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "finetune_head.safetensors"
CARD_FILE = "README.md"
LINEAR_HEAD = "head.1."
"""The prefix of the linear head's ``nn.Linear`` in finetune's model (``Sequential(Dropout, Linear)``)."""


def is_hub_meta(meta: dict[str, Any]) -> bool:
    return meta.get("layout") == LAYOUT


def timm_classifier(meta: dict[str, Any]) -> str | None:
    """The timm name of the classifier that holds a linear head's weights (``fc``, ``head.fc``...), or None when
    the folder's model is backbone + finetune head."""
    return meta.get("hub", {}).get("classifier")


def read_hub_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(read_text_file(path, "hub model config"))
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise FinetuneError(f"{path}: not a timm model config (a JSON object)")
    return config


def hub_state_dict(folder: str | Path, meta: dict[str, Any], map_location: str | torch.device = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """The weights of a hub-format folder under finetune's names (``backbone.*``, ``head.*``), after checking its
    ``config.json`` against ``checkpoint.json``.

    Raises:
        FinetuneError: a ``config.json`` naming another architecture or class count (edited by hand), or a
            weights file that is missing or unreadable; one line naming the file.
    """
    folder = Path(folder)
    config = read_hub_config(folder)
    classifier = timm_classifier(meta)
    expected = meta["num_classes"] if classifier else 0
    if config.get("architecture") != meta["backbone"]:
        raise FinetuneError(f"{folder / CONFIG_FILE}: architecture {config.get('architecture')!r} is not the "
                            f"checkpoint's backbone {meta['backbone']!r} (checkpoint.json)")
    if config.get("num_classes") != expected:
        raise FinetuneError(f"{folder / CONFIG_FILE}: num_classes {config.get('num_classes')!r} does not match the "
                            f"model: {expected} ({'its classes' if classifier else 'a backbone without classifier'}, "
                            "checkpoint.json)")
    state: dict[str, torch.Tensor] = {}
    for name, value in _read(folder / WEIGHTS_FILE, map_location).items():
        if classifier and name.startswith(classifier + "."):
            state[LINEAR_HEAD + name[len(classifier) + 1:]] = value
        else:
            state["backbone." + name] = value
    if not classifier:
        state.update({"head." + k: v for k, v in _read(folder / HEAD_FILE, map_location).items()})
    return state


def _read(path: Path, map_location) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FinetuneError(f"{path} is missing: a hub-format model folder needs it")
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise FinetuneError(f"{path} is not a readable safetensors file: {e}") from None


def download_hub_model(repo: str) -> Path:
    """``hf-hub:OWNER/NAME[@REVISION]``'s files in the local Hugging Face cache (downloaded when not there).

    Raises:
        FinetuneError: no network and not in the cache, no such repository, or not a finetune hub folder.
    """
    from huggingface_hub import snapshot_download  # lazy: only for hf-hub: references

    repo_id, _, revision = repo.partition("@")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None))
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated, bad name
        raise FinetuneError(f"cannot fetch hf-hub:{repo} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                            "check the name and the network, or log in with `hf auth login`") from None
    return path
