"""BatchPool: loader workers collate into shared-memory buffers they reuse once DeviceBatches hands them back."""
import os
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data import BatchPool, DeviceBatches, collate_skip
from finetune.data.transforms import BatchNormalize

SHAPE = (3, 6, 5)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _image(i: int) -> torch.Tensor:
    return ((torch.arange(torch.Size(SHAPE).numel()) * 7 + i * 13) % 256).to(torch.uint8).view(SHAPE)


class _Images(Dataset):
    """Distinct uint8 images, label = index; the indices in ``unreadable`` give None (as a bad file does)."""

    def __init__(self, n: int, unreadable=()):
        self.n, self.unreadable = n, set(unreadable)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return None if i in self.unreadable else (_image(i), i)


def _expected(labels: torch.Tensor) -> torch.Tensor:
    return BatchNormalize(MEAN, STD)(torch.stack([_image(int(i)) for i in labels]))


def _loader(dataset, pool, *, workers=1, persistent=True, batch=4, prefetch=2):
    return DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=pool, prefetch_factor=prefetch,
                      persistent_workers=persistent)


def _spy_release(monkeypatch, pool):
    tickets = []
    release = pool.release

    def spy(ticket):
        tickets.append(ticket)
        release(ticket)

    monkeypatch.setattr(pool, "release", spy)
    return tickets


def test_workers_reuse_their_buffers_and_every_batch_is_right(monkeypatch):
    pool = BatchPool(workers=2, slots=3)
    tickets = _spy_release(monkeypatch, pool)
    batches = DeviceBatches(_loader(_Images(30, unreadable={5, 17}), pool, workers=2), "cpu",
                            BatchNormalize(MEAN, STD))
    seen = 0
    for _ in range(4):
        for inputs, labels, skipped in batches:
            torch.testing.assert_close(inputs, _expected(labels), rtol=0, atol=1e-6)
            seen += len(labels)
    assert seen == 4 * 28
    assert len(tickets) == 4 * 8  # every batch came from a pooled buffer and was handed back
    for worker in (0, 1):
        keys = {(pid, index) for w, pid, index in tickets if w == worker}
        assert 1 <= len(keys) <= 3  # at most `slots` buffers per worker, across 4 epochs of 4 batches each


def test_a_batch_that_still_shares_its_buffer_is_not_handed_back(monkeypatch):
    """No normalisation on the CPU: the yielded tensor is the worker's buffer, so it must never be reused
    while the caller holds it (the kept batches would change under it)."""
    pool = BatchPool(workers=1, slots=2)
    tickets = _spy_release(monkeypatch, pool)
    kept = list(DeviceBatches(_loader(_Images(24), pool), "cpu", None))
    assert tickets == []
    for inputs, labels, _ in kept:
        assert torch.equal(inputs, torch.stack([_image(int(i)) for i in labels]))


def test_without_a_free_buffer_the_worker_collates_as_collate_skip():
    pool = BatchPool(workers=1, slots=2)
    batches = list(_loader(_Images(24, unreadable={3}), pool, prefetch=1))  # nothing is ever handed back
    assert [len(b) for b in batches] == [4, 4, 3, 3, 3, 3]
    reference = [collate_skip([_Images(24, unreadable={3})[i] for i in range(k, k + 4)]) for k in range(0, 24, 4)]
    for got, want in zip(batches, reference):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_an_epoch_left_unfinished_gives_its_buffers_back_at_the_next(monkeypatch):
    pool = BatchPool(workers=1, slots=3)
    tickets = _spy_release(monkeypatch, pool)
    batches = DeviceBatches(_loader(_Images(40), pool, prefetch=2), "cpu", BatchNormalize(MEAN, STD))
    for _ in range(3):  # each time: one batch taken, the rest of the epoch (two in flight) dropped by the loader
        next(iter(batches))
    time.sleep(1)  # the worker finishes the dropped batches: every buffer it has out is one no one will read
    tickets.clear()
    full = list(batches)
    assert len(full) == 10
    assert len(tickets) == 10  # without reclaim the buffers of the dropped batches would never come back
    for inputs, labels, _ in full:
        torch.testing.assert_close(inputs, _expected(labels), rtol=0, atol=1e-6)


def test_buffers_of_a_replaced_worker_are_never_reused(monkeypatch):
    """Workers that do not persist are new processes each epoch: keys handed back to an old one are dropped."""
    pool = BatchPool(workers=1, slots=2)
    tickets = _spy_release(monkeypatch, pool)
    batches = DeviceBatches(_loader(_Images(16), pool, persistent=False), "cpu", BatchNormalize(MEAN, STD))
    epochs = []
    for _ in range(3):
        start = len(tickets)
        for inputs, labels, _ in batches:
            torch.testing.assert_close(inputs, _expected(labels), rtol=0, atol=1e-6)
        epochs.append({(pid, index) for _, pid, index in tickets[start:]})
    pids = [{pid for pid, _ in keys} for keys in epochs]
    assert all(len(p) == 1 for p in pids) and len(set().union(*pids)) == 3  # one new worker process per epoch
    assert os.getpid() not in set().union(*pids)


def test_in_the_main_process_it_is_collate_skip():
    pool = BatchPool(workers=0, slots=2)
    samples = [_Images(3)[i] for i in range(3)] + [None]
    got, want = pool(samples), collate_skip(samples)
    assert len(got) == 3 and torch.equal(got[0], want[0]) and got[2] == 1


def test_make_loader_pools_only_when_asked_and_shm_has_room(monkeypatch):
    from finetune.training import loaders

    dataset = _Images(16)
    cpu = torch.device("cpu")
    assert isinstance(loaders.make_loader(dataset, sampler=range(16), batch_size=4, num_workers=1, device=cpu,
                                          reuse_buffers=True).collate_fn, BatchPool)
    assert loaders.make_loader(dataset, sampler=range(16), batch_size=4, num_workers=1,
                               device=cpu).collate_fn is collate_skip
    assert loaders.make_loader(dataset, sampler=range(16), batch_size=4, num_workers=0, device=cpu,
                               reuse_buffers=True).collate_fn is collate_skip

    class Full:  # room for the workers' prefetched batches, not for one buffer more each
        f_frsize = 1
        f_bavail = 2 * 2 * loaders.PREFETCH_FACTOR * 4 * torch.Size(SHAPE).numel()

    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    loader = loaders.make_loader(dataset, sampler=range(16), batch_size=4, num_workers=2, device=cpu,
                                 reuse_buffers=True)
    assert loader.num_workers == 2 and loader.prefetch_factor == loaders.PREFETCH_FACTOR
    assert loader.collate_fn is collate_skip


def test_the_training_loader_pools_its_uint8_batches(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune import _distributed as ddp
    from finetune.data import ImageDataset, build_transform
    from finetune.training.loaders import image_loader

    items = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 40, 3), i * 20, np.uint8)).save(path)
        items.append((path, i % 2))
    uint8 = build_transform(False, input_size=32, mean=MEAN, std=STD, device_normalize=True)
    floats = build_transform(False, input_size=32, mean=MEAN, std=STD)
    dist = ddp.DistInfo()
    kwargs = dict(train=True, balance=False, seed=0, batch_size=4, num_workers=1, dist=dist,
                  device=torch.device("cpu"))
    assert isinstance(image_loader(ImageDataset(items, uint8), **kwargs).collate_fn, BatchPool)
    assert image_loader(ImageDataset(items, floats), **kwargs).collate_fn is collate_skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_from_pooled_pinned_buffers_are_right(monkeypatch):
    pool = BatchPool(workers=2, slots=3)
    tickets = _spy_release(monkeypatch, pool)
    loader = DataLoader(_Images(40), batch_size=4, num_workers=2, collate_fn=pool, prefetch_factor=2,
                        persistent_workers=True, pin_memory=True)
    batches = DeviceBatches(loader, "cuda", BatchNormalize(MEAN, STD))
    for _ in range(3):
        for inputs, labels, _ in batches:
            assert inputs.is_cuda
            torch.testing.assert_close(inputs.cpu(), _expected(labels), rtol=0, atol=1e-6)
    assert len(tickets) == 30


def test_feature_extraction_through_pooled_workers_equals_in_process(monkeypatch, tmp_path):
    import numpy as np
    from PIL import Image

    import finetune.features.extract as extract
    from finetune.data import ImageDataset, batch_pool, build_transform

    items = []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        items.append((path, i % 3))
    dataset = ImageDataset(items, build_transform(False, input_size=16, mean=MEAN, std=STD, device_normalize=True))
    collates = []
    real = batch_pool.DataLoader
    monkeypatch.setattr(batch_pool, "DataLoader", lambda *a, **k: collates.append(k["collate_fn"]) or real(*a, **k))
    kwargs = dict(device=torch.device("cpu"), amp_dtype=None, batch_size=3)
    pooled, labels = extract.extract_features(torch.nn.Flatten(), dataset, num_workers=2, **kwargs)
    alone, labels_alone = extract.extract_features(torch.nn.Flatten(), dataset, num_workers=0, **kwargs)
    assert isinstance(collates[0], BatchPool) and collates[1] is collate_skip
    np.testing.assert_array_equal(labels, labels_alone)
    np.testing.assert_allclose(pooled, alone, rtol=0, atol=1e-6)


def test_a_ticket_comes_back_whatever_the_pin_memory_thread_made_of_it(monkeypatch):
    """PyTorch before 2.3 pins a batch's plain tuples into lists: release takes the ticket either way."""
    from types import SimpleNamespace

    import finetune.data.batch_pool as batch_pool

    monkeypatch.setattr(batch_pool, "get_worker_info", lambda: SimpleNamespace(id=0))  # collate as worker 0 would
    pool = BatchPool(workers=1, slots=1)
    images = _Images(8)
    first = pool([images[i] for i in range(4)])
    assert isinstance(first[3], tuple) and first[3] == (0, os.getpid(), 0)
    assert len(pool([images[i] for i in range(4, 8)])) == 3  # the one buffer is out: collate_skip's batch
    pool.release(list(first[3]))  # as the older pin thread hands it over
    second = pool([images[i] for i in range(4, 8)])
    assert len(second) == 4 and second[3] == first[3]  # the one buffer, reused
    assert second[0].untyped_storage().data_ptr() == first[0].untyped_storage().data_ptr()
    assert torch.equal(second[0], torch.stack([_image(i) for i in range(4, 8)]))


def test_workers_started_by_spawn_get_their_pipes():
    """Python 3.14 starts workers by forkserver, macOS by spawn: the pool is pickled into them, pipes and all."""
    from torch.utils.data import TensorDataset

    images = torch.stack([_image(i) for i in range(16)])
    pool = BatchPool(workers=1, slots=3)
    loader = DataLoader(TensorDataset(images, torch.arange(16)), batch_size=4, num_workers=1, collate_fn=pool,
                        prefetch_factor=2, persistent_workers=True, multiprocessing_context="spawn")
    keys = []
    for _ in range(2):
        pool.reclaim()
        for inputs, labels, skipped, ticket in loader:  # four items: every batch in a pooled buffer
            assert torch.equal(inputs, images[labels])
            keys.append(tuple(ticket))
            pool.release(ticket)
    assert len(keys) == 8 and len(set(keys)) <= 3
