"""A small /dev/shm shrinks what DataLoader workers prefetch (Docker's 64 MB default)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from finetune.training import loaders


@pytest.fixture
def shm_of(monkeypatch):
    """Make ``os.statvfs`` report ``free`` bytes for the loaders' /dev/shm check."""
    def set_free(free: int) -> None:
        monkeypatch.setattr(loaders.os, "statvfs", lambda path: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    loaders._shm_noticed.clear()
    return set_free


MB = 2**20


def test_a_large_shm_keeps_workers_and_prefetch(shm_of):
    shm_of(64 * 1024 * MB)
    assert loaders.shm_budget(8, 20 * MB, prefetch=4) == (8, 4)


def test_a_small_shm_prefetches_fewer_batches_then_uses_fewer_workers(shm_of, caplog):
    shm_of(64 * MB)  # 32 MB of budget
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert loaders.shm_budget(4, 4 * MB, prefetch=4) == (4, 2)  # 8 batches of 4 MB fit
    assert "/dev/shm has 64 MB free" in caplog.text and "using 4 workers x 2" in caplog.text
    assert loaders.shm_budget(8, 10 * MB, prefetch=4) == (3, 1)  # 3 batches fit: 3 workers, one each
    assert loaders.shm_budget(2, 40 * MB, prefetch=4) == (0, 1)  # not one batch: the main process loads


def test_shm_that_cannot_be_read_changes_nothing(monkeypatch):
    def fail(path):
        raise OSError("no such file")
    monkeypatch.setattr(loaders.os, "statvfs", fail)
    assert loaders.shm_budget(4, 100 * MB) == (4, 4)


def test_make_loader_sizes_its_prefetch_from_a_sample_and_the_free_shm(shm_of):
    dataset = TensorDataset(torch.zeros(64, 3, 64, 64), torch.zeros(64, dtype=torch.long))  # 48 KB a sample
    shm_of(8 * MB)  # 4 MB of budget: 85 samples, 2 batches of 32
    loader = loaders.make_loader(dataset, sampler=range(64), batch_size=32, num_workers=2, device=torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor) == (2, 1)
    shm_of(1024 * MB)
    loader = loaders.make_loader(dataset, sampler=range(64), batch_size=32, num_workers=2, device=torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor) == (2, loaders.PREFETCH_FACTOR)
