"""A small /dev/shm shrinks what DataLoader workers prefetch (Docker's 64 MB default): `shm_budget`, the
training loader and the one-pass loader of evaluation, extraction and prediction."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from finetune.data import batch_pool
from finetune.training import loaders


@pytest.fixture
def shm_of(monkeypatch):
    """Make ``os.statvfs`` report ``free`` bytes for the loaders' /dev/shm check."""
    def set_free(free: int) -> None:
        monkeypatch.setattr(batch_pool.os, "statvfs", lambda path: SimpleNamespace(f_bavail=free // 4096,
                                                                                    f_frsize=4096))
    batch_pool._shm_noticed.clear()
    return set_free


MB = 2**20


def test_a_large_shm_keeps_workers_and_prefetch(shm_of):
    shm_of(64 * 1024 * MB)
    assert batch_pool.shm_budget(8, 20 * MB, prefetch=4) == (8, 4)


def test_a_small_shm_prefetches_fewer_batches_then_uses_fewer_workers(shm_of, caplog):
    shm_of(64 * MB)  # 32 MB of budget
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert batch_pool.shm_budget(4, 4 * MB, prefetch=4) == (4, 2)  # 8 batches of 4 MB fit
    assert "/dev/shm has 64 MB free" in caplog.text and "using 4 workers x 2" in caplog.text
    assert batch_pool.shm_budget(8, 10 * MB, prefetch=4) == (3, 1)  # 3 batches fit: 3 workers, one each
    assert batch_pool.shm_budget(2, 40 * MB, prefetch=4) == (0, 1)  # not one batch: the main process loads


def test_shm_that_cannot_be_read_changes_nothing(monkeypatch):
    def fail(path):
        raise OSError("no such file")
    monkeypatch.setattr(batch_pool.os, "statvfs", fail)
    assert batch_pool.shm_budget(4, 100 * MB, prefetch=4) == (4, 4)


def test_make_loader_sizes_its_prefetch_from_a_sample_and_the_free_shm(shm_of):
    dataset = TensorDataset(torch.zeros(64, 3, 64, 64), torch.zeros(64, dtype=torch.long))  # 48 KB a sample
    shm_of(8 * MB)  # 4 MB of budget: 85 samples, 2 batches of 32
    loader = loaders.make_loader(dataset, sampler=range(64), batch_size=32, num_workers=2, device=torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor) == (2, 1)
    shm_of(1024 * MB)
    loader = loaders.make_loader(dataset, sampler=range(64), batch_size=32, num_workers=2, device=torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor) == (2, loaders.PREFETCH_FACTOR)


def test_the_one_pass_loader_fits_its_workers_to_the_free_shm(shm_of):
    dataset = TensorDataset(torch.zeros(64, 3, 64, 64, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    # 12 KB a sample, batches of 32: 384 KB; 1 MB free is a budget of one batch
    shm_of(1 * MB)
    loader = batch_pool.one_pass_loader(dataset, batch_size=32, num_workers=2, device="cpu", normalize=None)
    assert (loader.loader.num_workers, loader.loader.prefetch_factor) == (1, 1)
    shm_of(1024 * MB)
    loader = batch_pool.one_pass_loader(dataset, batch_size=32, num_workers=2, device="cpu", normalize=None)
    assert (loader.loader.num_workers, loader.loader.prefetch_factor) == (2, batch_pool.ONE_PASS_PREFETCH)
    assert torch.equal(torch.cat([inputs for inputs, _, _ in loader]), dataset.tensors[0])


def test_prediction_with_too_little_shm_loads_in_the_main_process_with_a_notice(shm_of, caplog):
    """Regression: evaluation, extraction and prediction started their workers whatever /dev/shm held, and in
    a container with Docker's 64 MB their batches died of a bus error."""
    import numpy as np

    from finetune.data import build_transform
    from finetune.inference.predictor import predict_probabilities

    images = [np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8) for i in range(8)]
    transform = build_transform(False, input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, device_normalize=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3)).eval()
    expected = predict_probabilities(model, images, transform, batch_size=4, num_workers=0)[1]
    shm_of(4096)  # not one batch of 4 images
    with caplog.at_level(logging.WARNING, logger="finetune"):
        indices, probs, errors = predict_probabilities(model, images, transform, batch_size=4, num_workers=2)
    assert "too little for 2 workers x 2 batches" in caplog.text and "using 0 workers" in caplog.text
    assert indices.tolist() == list(range(8)) and not errors
    np.testing.assert_allclose(probs, expected, atol=1e-6)
