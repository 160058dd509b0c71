"""The decoded-pixel store (data.store): what it holds, that it is reused, rebuilt per entry, atomic, shared."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import albumentations as A
import numpy as np
import pytest
import torch

from finetune.data import ImageDataset, build_store, build_transform, load_image, store_plan
from finetune.data import store as store_module
from finetune.data.store import RRC_HEADROOM, StorePlan, shrink
from finetune.errors import FinetuneError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photos(folder, make_image, n=6, size=(90, 60), fmt="png"):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (size[1] + i, size[0], 3), dtype=np.uint8)).save(path)
        paths.append((path, i % 2))
    return paths


@pytest.fixture
def decodes(monkeypatch):
    """Source images the store decodes, in call order."""
    calls = []
    real = store_module._stored_image

    def spy(path, plan, max_pixels):
        calls.append(path.name)
        return real(path, plan, max_pixels)

    monkeypatch.setattr(store_module, "_stored_image", spy)
    return calls


def test_plan_applies_a_deterministic_first_op_and_keeps_headroom_before_random_resized_crop():
    eval_pipeline = build_transform(False, input_size=224, mean=MEAN, std=STD, device_normalize=True)
    plan, rest, _ = store_plan(eval_pipeline, "auto")
    assert plan.op.startswith("SmallestMaxSize(") and "max_size=256" in plan.op
    assert [type(t).__name__ for t in rest.transforms] == ["CenterCrop", "ToTensorV2"]
    assert rest.batch_normalize is eval_pipeline.batch_normalize

    train_pipeline = build_transform(True, input_size=224, mean=MEAN, std=STD)
    plan, rest, _ = store_plan(train_pipeline, "auto")
    assert plan == StorePlan(size=int(np.ceil(RRC_HEADROOM * 224))) == StorePlan(size=280) and rest is train_pipeline

    crop_first = build_transform(True, input_size=32, mean=MEAN, std=STD, ops=[{"name": "RandomCrop", "height": 32, "width": 32}])
    assert store_plan(crop_first, "auto")[0] is None  # a crop of the photo must see the photo
    assert store_plan(crop_first, 48)[0] == StorePlan(size=48)
    assert store_plan(train_pipeline, "off")[0] is None
    with pytest.raises(FinetuneError, match="at least 8"):
        store_plan(train_pipeline, 4)


def test_round_trip_equals_load_image_and_the_same_resize(tmp_path, make_image):
    items = _photos(tmp_path / "src", make_image)
    shrunk = build_store(items, StorePlan(size=40), cache_dir=tmp_path / "cache")
    op = A.SmallestMaxSize(max_size=50, interpolation=2)
    applied = build_store(items, StorePlan(op=repr(op)), cache_dir=tmp_path / "cache", workers=2)
    for i, (path, _) in enumerate(items):
        np.testing.assert_array_equal(shrunk[i], shrink(load_image(path), 40))
        assert min(shrunk[i].shape[:2]) == 40
        np.testing.assert_array_equal(applied[i], op(image=load_image(path))["image"])
    assert shrunk.meta["codec"] == "raw" and shrunk.meta["decoded"] == len(items)


def test_eval_predictions_through_the_store_equal_those_from_the_files(tmp_path, make_image):
    items = _photos(tmp_path / "src", make_image, size=(300, 200))
    pipeline = build_transform(False, input_size=64, mean=MEAN, std=STD, device_normalize=True)
    plan, rest, _ = store_plan(pipeline, "auto")
    store = build_store(items, plan, cache_dir=tmp_path / "cache")
    from_files, from_store = ImageDataset(items, pipeline), ImageDataset(items, rest, store=store)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    for i in range(len(items)):
        a, b = from_files[i][0], from_store[i][0]
        assert a.dtype == torch.uint8 and torch.equal(a, b)
        norm = pipeline.batch_normalize
        assert torch.equal(model(norm(a[None])), model(norm(b[None])))


def test_a_second_build_reads_no_source_image(tmp_path, make_image, decodes, monkeypatch):
    items = _photos(tmp_path / "src", make_image)
    first = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    assert len(decodes) == len(items)
    decodes.clear()
    monkeypatch.setattr(store_module, "read_file", lambda *a: pytest.fail("a source was read"))
    second = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    assert decodes == [] and second.folder == first.folder
    dataset = ImageDataset(items, A.Compose([A.ToTensorV2()]), store=second)
    monkeypatch.setattr("finetune.data.datasets.load_image", lambda *a, **k: pytest.fail("a file was decoded"))
    assert dataset[0][0].shape[1:] == second[0].shape[:2]


def test_a_changed_file_rebuilds_only_its_entry(tmp_path, make_image, decodes):
    items = _photos(tmp_path / "src", make_image)
    first = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    before = [first[i] for i in range(len(items))]
    changed = items[2][0]
    from PIL import Image

    Image.fromarray(np.full((70, 50, 3), 9, np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    decodes.clear()
    second = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    assert decodes == [changed.name]
    assert second.folder != first.folder and second.meta["reused"] == len(items) - 1
    for i in range(len(items)):
        if i == 2:
            assert (second[i] == 9).all()
        else:
            np.testing.assert_array_equal(second[i], before[i])


def test_bad_files_are_counted_once_at_the_build_and_skipped_quietly_after(tmp_path, make_image, caplog):
    items = _photos(tmp_path / "src", make_image, n=3)
    broken = tmp_path / "src" / "broken.png"
    broken.write_bytes(b"not an image")
    items.append((broken, 1))
    with caplog.at_level(logging.WARNING):
        store = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "1 of 4 images could not be read" in warnings[0] and "broken.png" in warnings[0]
    assert store.bad == 1 and store[3] is None
    caplog.clear()
    dataset = ImageDataset(items, A.Compose([A.ToTensorV2()]), store=store)
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):
            dataset.set_epoch(epoch)
            assert dataset[3] is None and dataset[0] is not None
    assert not caplog.records


def test_over_budget_the_store_keeps_jpeg_444_and_says_so_in_one_line(tmp_path, make_image, caplog):
    items = _photos(tmp_path / "src", make_image, size=(120, 80))
    with caplog.at_level(logging.WARNING):
        store = build_store(items, StorePlan(size=64), cache_dir=tmp_path / "cache", budget=1000)
    assert store.meta["codec"] == "jpeg q95 4:4:4"
    assert sum("storing JPEG q95 4:4:4" in r.getMessage() for r in caplog.records) == 1
    assert (store.index["codec"] == store_module.JPEG).all()
    raw = shrink(load_image(items[0][0]), 64)
    assert store[0].shape == raw.shape
    assert np.abs(store[0].astype(int) - raw).mean() < 12  # q95 of random noise: close, not equal
    assert store.meta["bytes"] < raw.nbytes * len(items)


_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from finetune.data import store as s
    real = s._stored_image
    def slow(*a):
        time.sleep(float(sys.argv[3]))
        return real(*a)
    s._stored_image = slow
    items = [(p, 0) for p in sorted(Path(sys.argv[1]).glob("*.png"))]
    store = s.build_store(items, s.StorePlan(size=32), cache_dir=sys.argv[2], workers=0)
    print(store.folder)
""")


@pytest.mark.slow
def test_kill_9_during_the_build_leaves_no_store_to_read_and_the_next_build_completes(tmp_path, make_image):
    items = _photos(tmp_path / "src", make_image, n=12)
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path / "src"), str(tmp_path / "cache"), "0.2"])
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache").rglob(".*.tmp-*/pixels.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "cache").rglob(".*.tmp-*"))  # it was killed mid-build
    assert not list((tmp_path / "cache").rglob("meta.json"))  # nothing a reader would open
    store = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    assert store.meta["decoded"] == len(items) and store.bad == 0
    assert not list((tmp_path / "cache").rglob(".*.tmp-*"))  # the dead build's folder is gone


@pytest.mark.slow
def test_two_processes_building_at_once_publish_one_store(tmp_path, make_image):
    items = _photos(tmp_path / "src", make_image, n=8)
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path / "src"), str(tmp_path / "cache"), "0.05"],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(folders) == 1
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 1
    assert not list((tmp_path / "cache").rglob(".*.tmp-*"))
    store = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    assert str(store.folder) in folders and json.loads((store.folder / "meta.json").read_text())["images"] == 8


def test_a_training_split_shares_one_store_between_the_ranks_of_a_machine(tmp_path, make_image, monkeypatch):
    """Local rank 0 builds; another rank of the machine, after the barrier, opens the same store and decodes nothing."""
    from finetune import _distributed as ddp
    from finetune.training.loaders import split_dataset

    items = _photos(tmp_path / "src", make_image)
    pipeline = build_transform(True, input_size=32, mean=MEAN, std=STD, device_normalize=True)
    barriers = []
    monkeypatch.setattr(ddp, "barrier", lambda dist: barriers.append(dist.rank))
    rank0 = ddp.DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2)
    rank1 = ddp.DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    first = split_dataset(items, pipeline, store="auto", budget=None, cache_dir=str(tmp_path / "cache"), seed=0, dist=rank0)
    monkeypatch.setattr(store_module, "_stored_image", lambda *a: pytest.fail("rank 1 decoded an image"))
    second = split_dataset(items, pipeline, store="auto", budget=None, cache_dir=str(tmp_path / "cache"), seed=0, dist=rank1)
    assert barriers == [0, 1]
    assert first.store.folder == second.store.folder
    assert torch.equal(first[0][0], second[0][0])


def test_the_batches_workers_ship_are_uint8_and_normalised_on_the_device_like_the_cpu(tmp_path, make_image):
    from finetune.data import DeviceBatches, collate_skip

    items = _photos(tmp_path / "src", make_image)
    uint8 = build_transform(False, input_size=32, mean=MEAN, std=STD, device_normalize=True)
    cpu = build_transform(False, input_size=32, mean=MEAN, std=STD)
    loader = torch.utils.data.DataLoader(ImageDataset(items, uint8), batch_size=3, num_workers=1, collate_fn=collate_skip)
    raw = next(iter(loader))[0]
    assert raw.dtype == torch.uint8
    batches = list(DeviceBatches(loader, "cpu", uint8.batch_normalize))
    expected = torch.stack([cpu(image=load_image(p))["image"] for p, _ in items])
    got = torch.cat([b[0] for b in batches])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert len(DeviceBatches(loader, "cpu")) == len(loader) and DeviceBatches(loader, "cpu").batch_size == 3


def test_an_op_that_writes_into_a_stored_image_changes_neither_the_store_nor_the_next_read(tmp_path, make_image):
    items = _photos(tmp_path / "src", make_image, n=2)
    store = build_store(items, StorePlan(size=32), cache_dir=tmp_path / "cache")
    before = (store.folder / "pixels.bin").read_bytes()
    image = store[0]
    image[:] = 0  # an in-place op in a worker
    assert not (store[0] == 0).all()  # the next epoch reads the stored pixels again
    assert (store.folder / "pixels.bin").read_bytes() == before
