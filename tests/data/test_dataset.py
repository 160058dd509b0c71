import logging

import pytest
import torch
from torch.utils.data import DataLoader

from finetune.data import ImageDataset, build_transform, collate_skip, prepare_manifest

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
AUGMENT = [
    {"name": "Resize", "height": 20, "width": 20},
    {"name": "Rotate", "limit": 30, "p": 1.0},
    {"name": "RandomCrop", "height": 16, "width": 16},
    {"name": "HorizontalFlip"},
    {"name": "ColorJitter", "p": 1.0},
]


@pytest.fixture
def train_set(bird_root):
    manifest, _ = prepare_manifest(bird_root, scan=False)
    transform = build_transform(True, input_size=16, mean=MEAN, std=STD, ops=AUGMENT)
    return ImageDataset(manifest.items("train"), transform, seed=3)


def epoch_images(dataset, epoch, **loader_kwargs):
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip, **loader_kwargs)
    return torch.cat([images for images, _, _ in loader])


def test_sample_is_a_tensor_and_its_class_index(train_set):
    image, label = train_set[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert label == 0 and train_set.labels == [0] * 6 + [1] * 6 + [2] * 6 and len(train_set) == 18


def test_augmentation_is_the_same_for_the_same_seed_epoch_and_index(train_set):
    first = train_set[5][0]
    train_set[2]  # other samples in between change nothing
    assert torch.equal(train_set[5][0], first)
    train_set.set_epoch(1)
    assert not torch.equal(train_set[5][0], first)
    train_set.set_epoch(0)
    assert torch.equal(train_set[5][0], first)


def test_the_seed_changes_the_augmentation(train_set):
    other = ImageDataset(train_set.items, train_set.transform, seed=4)
    assert not torch.equal(other[5][0], train_set[5][0])


def test_a_pipeline_set_after_the_first_sample_draws_from_the_sample_streams_too(train_set):
    first = train_set[5][0]  # the dataset's generators now exist, seeded for this sample and drawn from
    train_set.transform = build_transform(True, input_size=16, mean=MEAN, std=STD, ops=AUGMENT)
    assert torch.equal(train_set[5][0], first)


def test_samples_of_one_epoch_get_different_augmentations(train_set):
    # Two samples made from the same file must still be augmented differently.
    train_set.items[1] = train_set.items[0]
    assert not torch.equal(train_set[0][0], train_set[1][0])


def test_augmentation_does_not_depend_on_the_number_of_workers(train_set):
    single = epoch_images(train_set, 2, num_workers=0)
    assert torch.equal(epoch_images(train_set, 2, num_workers=2), single)
    assert not torch.equal(epoch_images(train_set, 3, num_workers=0), single)


def test_set_epoch_reaches_persistent_workers(train_set):
    expected = [epoch_images(train_set, epoch, num_workers=0) for epoch in (0, 1)]
    loader = DataLoader(train_set, batch_size=4, collate_fn=collate_skip, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        train_set.set_epoch(epoch)
        assert torch.equal(torch.cat([images for images, _, _ in loader]), expected[epoch])


def test_unreadable_file_gives_none_with_a_warning_and_no_substitute(train_set, caplog):
    path, _ = train_set.items[4]
    path.write_bytes(b"")  # unreadable after the scan, during training
    with caplog.at_level(logging.WARNING):
        assert train_set[4] is None
    assert f"skipping unreadable image {path}: empty file (0 bytes)" in caplog.text
    images, labels, skipped = collate_skip([train_set[i] for i in range(6)])
    assert skipped == 1 and images.shape == (5, 3, 16, 16) and labels.tolist() == [0] * 5


def test_collate_skip_counts_dropped_samples_and_handles_all_dropped():
    sample = (torch.zeros(3, 4, 4), 2)
    images, labels, skipped = collate_skip([sample, None, sample])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [2, 2] and labels.dtype == torch.int64 and skipped == 1
    images, labels, skipped = collate_skip([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2
