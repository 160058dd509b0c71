"""Augmentation presets (data.augment): timm policies and albumentations' Erasing in the numpy pipeline."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import ImageDataset, build_transform
from finetune.data.transforms import TimmPolicy, size_defaults

MEAN = STD = (0.5, 0.5, 0.5)
RESIZE = [{"name": "Resize", "height": 32, "width": 32}]
PRESETS = [
    {"preset": "randaugment", "num_ops": 2, "magnitude": 9},
    {"preset": "trivialaugment", "magnitude": 10},
    {"preset": "autoaugment", "policy": "original"},
]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        items.append((path, 0))
    return items


def samples(items, augment, epoch):
    dataset = ImageDataset(items, build_transform(True, input_size=32, mean=MEAN, std=STD, ops=RESIZE,
                                                  augment=augment), seed=3)
    dataset.set_epoch(epoch)
    return [dataset[i][0] for i in range(len(items))]


@pytest.mark.parametrize("augment", PRESETS, ids=lambda a: a["preset"])
def test_preset_changes_pixels_deterministically_per_seed_epoch_and_sample(images, augment):
    plain = samples(images, None, 0)
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    first = samples(images, augment, 0)
    # the policy seeds timm's global generators per image and puts them back
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state)
    assert all(torch.equal(a, b) for a, b in zip(first, samples(images, augment, 0)))  # same (seed, epoch, index)
    changed = [not torch.equal(a, b) for a, b in zip(first, plain)]
    assert sum(changed) >= 3, changed  # RandAugment applies each op with p 0.5: most images change
    next_epoch = samples(images, augment, 1)
    assert sum(not torch.equal(a, b) for a, b in zip(first, next_epoch)) >= 3


def test_random_erasing_erases_one_rectangle_within_the_scale():
    transform = build_transform(True, input_size=32, mean=(0, 0, 0), std=(1, 1, 1), ops=RESIZE, augment={
        "random_erasing": {"p": 1.0, "scale": [0.1, 0.2], "fill": 0}})
    image = np.full((32, 32, 3), 200, np.uint8)
    for seed in range(5):
        transform.set_random_seed(seed)
        erased = (transform(image=image)["image"] == 0).all(0).numpy()
        rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        box = erased[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and box.sum() == erased.sum()  # one filled rectangle
        assert 0.08 <= erased.mean() <= 0.22  # scale 0.1-0.2 of the area, up to rounding of its sides


def test_size_defaults_are_off_below_96_px_mild_below_160_and_strong_above():
    assert size_defaults(32) == {"augment": None, "mixup": None}
    assert size_defaults((3, 64, 64)) == {"augment": None, "mixup": None}
    mid = size_defaults(128)
    assert mid["augment"]["preset"] == "trivialaugment" and mid["mixup"] is None
    big = size_defaults((3, 224, 224))
    assert big["augment"]["preset"] == "randaugment" and big["augment"]["random_erasing"]["p"] == 0.25
    assert big["mixup"]["mixup_alpha"] > 0 and big["mixup"]["cutmix_alpha"] > 0


@pytest.mark.parametrize("size, policy", [(64, None), (128, "rand-m5-n1-mstd101-p1.0"), (224, "rand-m9-n2-mstd0.5")])
def test_auto_builds_the_size_default_in_train_pipelines_only(size, policy):
    train = build_transform(True, input_size=size, mean=MEAN, std=STD, augment="auto")
    policies = [t.config for t in train.transforms if isinstance(t, TimmPolicy)]
    assert policies == ([policy] if policy else [])
    assert any(type(t).__name__ == "Erasing" for t in train.transforms) == (size >= 160)
    evaluation = build_transform(False, input_size=size, mean=MEAN, std=STD, augment="auto")
    assert not any(isinstance(t, TimmPolicy) for t in evaluation.transforms)


def test_readme_augmentation_example_is_a_valid_recipe_part(tiny_recipe):
    import re
    from pathlib import Path

    import yaml

    from finetune.config import parse_recipe

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"\*\*Augmentation presets and Mixup/CutMix\*\*.*?```yaml\n(.*?)```", readme, re.S).group(1)
    example = yaml.safe_load(block)
    tiny_recipe["data"].update(example["data"])
    tiny_recipe["training"].update(example["training"])
    tiny_recipe["stages"] = example["stages"]
    recipe = parse_recipe(tiny_recipe)
    assert recipe.data.augment.preset == "randaugment" and recipe.data.augment.random_erasing.p == 0.25
    assert recipe.training.mixup.cutmix_alpha == 1.0 and recipe.stages[1].mixup.cutmix_alpha == 0.0


@pytest.mark.parametrize("augment", [
    {"preset": "randaugment", "num_ops": 3, "magnitude": 0}, {"preset": "randaugment", "magnitude": 10},
    {"preset": "trivialaugment", "magnitude": 10}, {"preset": "autoaugment", "policy": "v0"},
    {"preset": "autoaugment", "policy": "originalr"},
], ids=lambda a: f"{a['preset']}-{a.get('magnitude', a.get('policy'))}")
def test_every_op_of_a_preset_runs_at_any_magnitude(augment):
    """timm's Posterize asks Pillow for 0 bits at low magnitudes, which Pillow 13 refuses: kept at 1 bit."""
    transform = build_transform(True, input_size=16, mean=MEAN, std=STD, ops=[{"name": "Resize", "height": 16,
                                                                             "width": 16}], augment=augment)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for seed in range(400):
        transform.set_random_seed(seed)
        assert transform(image=image)["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("preset", ["randaugment", "trivialaugment"])
def test_the_magnitude_changes_the_augmented_images(tmp_path, preset):
    """The magnitude reaches the ops: with the same seed (so the same ops are drawn for each image), images
    augmented at magnitude 2 and at 9 differ, while two runs at one magnitude are equal. (Not "more change at a
    larger magnitude": timm's Posterize and Solarize are strongest at low magnitudes.)"""
    y, x = np.mgrid[0:40, 0:40]
    items = []
    for i in range(12):
        image = np.stack([(x * 6 + i) % 256, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        items.append((tmp_path / f"{i}.png", 0))

    def run(magnitude: int):
        return samples(items, {"preset": preset, "magnitude": magnitude,
                               **({"num_ops": 2} if preset == "randaugment" else {})}, 0)

    low, high = run(2), run(9)
    assert all(torch.equal(a, b) for a, b in zip(high, run(9)))
    assert sum(not torch.equal(a, b) for a, b in zip(low, high)) >= len(items) // 2
