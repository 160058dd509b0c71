"""Tiny image folders, models and checkpoints for the evaluation, inference and export tests.

Images are 40×40 noisy PNGs of one colour. :class:`ColourNet` classifies them by their dominant channel,
so a folder's confusion matrix is known by construction; checkpoints hold random-init timm test backbones
with a small SpinalNet head at 32 px.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torch import nn

from finetune.models.checkpoint import save_checkpoint
from finetune.models import create_model

COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 220)}
PREPROCESSING = {
    "input_size": [3, 32, 32],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


class ColourNet(nn.Module):
    """Logits are 4 × each channel's mean: red images → class 0, green → 1, blue → 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * x.mean(dim=(2, 3))


def write_images(root: Path, images: dict[str, list[tuple[int, int, int]]], seed: int = 0) -> Path:
    """One folder per class under ``root``; each colour in a class's list becomes one noisy 40×40 PNG."""
    rng = np.random.default_rng(seed)
    for name, colours in images.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


def make_checkpoint(path: Path, backbone: str, classes: list[str], seed: int = 0, **backbone_kwargs) -> Path:
    torch.manual_seed(seed)
    model = create_model(backbone, len(classes), head={"name": "spinal", "width": 16, "layers": 2},
                         **backbone_kwargs).eval()
    # Random BatchNorm statistics, so eval-mode BatchNorm is not the identity and exports must carry it.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(path, model, {"classes": classes, "preprocessing": PREPROCESSING, "metrics": {},
                                         "recipe": {"data": {"seed": 0}}})


@pytest.fixture(name="write_images")
def write_images_fixture():
    """``write_images(root, {class: [colour, ...]}, seed=0)``: one noisy PNG per colour."""
    return write_images


@pytest.fixture(name="make_checkpoint", scope="session")
def make_checkpoint_fixture():
    """``make_checkpoint(path, backbone, classes, seed=0, **backbone_kwargs)``: a random-init checkpoint."""
    return make_checkpoint


@pytest.fixture
def colour_net() -> ColourNet:
    return ColourNet()


@pytest.fixture
def preprocessing() -> dict:
    """The 32-px preprocessing every test checkpoint carries."""
    return copy.deepcopy(PREPROCESSING)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A test_efficientnet checkpoint for the classes cat, dog, fox."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", "test_efficientnet", list(COLOURS))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """cat/, dog/, fox/ with 4 PNGs each."""
    return write_images(tmp_path / "images", {name: [colour] * 4 for name, colour in COLOURS.items()})
