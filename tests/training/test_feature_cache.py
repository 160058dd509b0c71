"""The feature cache: head-only stages train from cached backbone features, reused only when everything
the features depend on is unchanged; an entry counts only when complete, so evicting or killing never
leaves one that a later run takes as valid."""
import copy
import csv
import os
import shutil
import stat
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import finetune.features.cache as fc
import finetune.features.extract as fx
from finetune.config import parse_recipe
from finetune.features.cache import evict, write_meta
from finetune.training.runner import run_training


def head_only(raw, cache, epochs=2, **stage):
    raw = copy.deepcopy(raw)
    raw["stages"] = [{"name": "head", "epochs": epochs, "train": "head", **stage}]
    raw["training"]["cache_dir"] = str(cache)
    raw["output"] = {"evaluate_test": False}
    return raw


def train(raw, run_dir):
    return run_training(parse_recipe(raw), raw, run_dir=run_dir, quiet=True)


def entries(cache):
    """The feature cache entries under ``cache_dir`` (in its ``features/``)."""
    folder = cache / "features"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.exists() else []


def val_accuracy(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [float(r["val_acc"]) for r in csv.DictReader(f)]


def test_head_stage_uses_the_cache_and_reuses_it_across_runs(tiny_recipe, tmp_path, monkeypatch):
    import finetune.features.cache as fc

    calls = []
    real = fc.extract_into
    monkeypatch.setattr(fc, "extract_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache)
    train(raw, tmp_path / "a")
    assert len(entries(cache)) == 1 and len(calls) == 2  # train and val features
    train(raw, tmp_path / "b")
    assert len(calls) == 2  # the second run computed nothing
    assert len(entries(cache)) == 1
    assert val_accuracy(tmp_path / "a") == val_accuracy(tmp_path / "b")


def test_cache_is_invalidated_when_weights_transforms_or_data_change(tiny_recipe, tmp_path, make_tiny_folder):
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache)
    train(raw, tmp_path / "a")
    changed_aug = copy.deepcopy(raw)
    changed_aug["stages"][0]["feature_cache_views"] = 2
    train(changed_aug, tmp_path / "b")
    assert len(entries(cache)) == 2
    changed_weights = copy.deepcopy(raw)
    changed_weights["model"]["backbone_kwargs"] = {}
    changed_weights["training"]["seed"] = 1  # another random init: other backbone weights
    train(changed_weights, tmp_path / "c_run")
    assert len(entries(cache)) == 3
    make_tiny_folder(tmp_path / "tiny2", per_class=13)
    changed_data = copy.deepcopy(raw)
    changed_data["data"]["root"] = str(tmp_path / "tiny2")
    train(changed_data, tmp_path / "d")
    assert len(entries(cache)) == 4


def test_stage_runs_uncached_when_the_cache_would_exceed_its_size_limit(tiny_recipe, tmp_path):
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache)
    raw["training"]["cache_max_gb"] = 1e-9
    train(raw, tmp_path / "a")
    assert entries(cache) == []


def test_feature_cache_false_and_non_head_stages_run_uncached(tiny_recipe, tmp_path):
    cache = tmp_path / "c"
    train(head_only(tiny_recipe, cache, feature_cache=False), tmp_path / "a")
    raw = head_only(tiny_recipe, cache)
    raw["stages"][0]["train"] = "last:1"
    train(raw, tmp_path / "b")
    assert entries(cache) == []


def test_eviction_removes_least_recently_used_entries_first(tmp_path):
    names = {"old": "a" * 24, "mid": "b" * 24, "new": "c" * 24}
    for i, name in enumerate(names.values()):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.npy").write_bytes(b"x" * 1000)
        write_meta(folder, {})
        os.utime(folder / "meta.json", (time.time() - 100 + i, time.time() - 100 + i))
    (tmp_path / "images").mkdir()  # not a cache entry: left alone
    removed = evict(tmp_path, limit=2500, keep=tmp_path / names["old"])
    assert removed == [tmp_path / names["mid"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["new"], names["old"], "images"])


@pytest.mark.slow
def test_cached_head_stage_matches_the_uncached_accuracy_on_digits(tmp_path):
    """Real pretrained features on real data: the cache changes speed, not what the head learns."""
    from finetune.data import write_digits

    root = write_digits(tmp_path / "digits", size=32)
    raw = {
        "data": {"root": str(root), "val": 0.2, "test": 0.1, "input_size": 48, "num_workers": 0,
                 "train_transforms": [{"name": "Resize", "height": 48, "width": 48}],
                 "eval_transforms": [{"name": "Resize", "height": 48, "width": 48}]},
        "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "offline", "head": "linear"},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        "stages": [{"name": "head", "epochs": 3, "train": "head"}],
        "training": {"batch_size": 64, "device": "cpu", "cache_dir": str(tmp_path / "cache")},
        "output": {"evaluate_test": False},
    }
    train(raw, tmp_path / "cached")
    uncached = copy.deepcopy(raw)
    uncached["stages"][0]["feature_cache"] = False
    train(uncached, tmp_path / "uncached")
    a, b = val_accuracy(tmp_path / "cached")[-1], val_accuracy(tmp_path / "uncached")[-1]
    assert a > 0.8 and b > 0.8  # pretrained ImageNet features separate digits well
    assert abs(a - b) <= 0.02


def test_a_cache_finished_first_by_another_run_is_kept(tmp_path):
    from finetune.features.cache import _write_folder

    folder = tmp_path / "key"
    _write_folder(folder, lambda tmp: write_meta(tmp, "first"))
    _write_folder(folder, lambda tmp: write_meta(tmp, "second"))
    assert '"first"' in (folder / "meta.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary folder left behind


def weights_file(path, seed):
    torch.manual_seed(seed)
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(path))
    return str(path)


def test_cache_is_not_reused_for_other_backbone_kwargs_or_other_weights_with_the_same_seed(tiny_recipe, tmp_path):
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache, epochs=1)
    raw["model"]["pretrained"] = weights_file(tmp_path / "a.safetensors", seed=1)
    train(raw, tmp_path / "a")
    assert len(entries(cache)) == 1
    pooled_by_max = copy.deepcopy(raw)
    pooled_by_max["model"]["backbone_kwargs"] = {"global_pool": "max"}  # same weights, other features
    train(pooled_by_max, tmp_path / "b")
    assert len(entries(cache)) == 2
    other_weights = copy.deepcopy(raw)
    other_weights["model"]["pretrained"] = weights_file(tmp_path / "b.safetensors", seed=2)
    train(other_weights, tmp_path / "c_run")
    assert len(entries(cache)) == 3


def test_cache_is_not_reused_after_the_eval_transform_or_the_decoding_code_changed(tiny_recipe, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache, epochs=1)
    train(raw, tmp_path / "a")
    other_transform = copy.deepcopy(raw)
    other_transform["data"]["eval_transforms"] = [{"name": "Resize", "height": 32, "width": 32, "interpolation": 0}]
    train(other_transform, tmp_path / "b")
    assert len(entries(cache)) == 2
    real = fc.code_fingerprint()
    monkeypatch.setattr(fc, "code_fingerprint", lambda: {**real, "cv2": "0.0.1"})  # another OpenCV decodes
    train(raw, tmp_path / "c_run")
    assert len(entries(cache)) == 3


def test_code_fingerprint_names_the_decoder_libraries_and_the_finetune_source(monkeypatch):
    import albumentations

    before = fc.code_fingerprint()
    assert {"finetune", "finetune_source", "timm", "torch", "albumentations", "cv2", "PIL", "numpy"} <= set(before)
    monkeypatch.setattr(albumentations, "__version__", "0.0.1")
    assert fc.code_fingerprint() != before


def test_cache_key_sees_an_image_rewritten_with_the_same_size_and_modification_time(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"A" * 5000 + b"B" * 5000)
    items = {"train": [(image, 0)]}
    backbone = torch.nn.Linear(2, 2)
    before = fc.cache_key(backbone, {}, items)
    st = image.stat()
    image.write_bytes(b"A" * 5000 + b"C" * 5000)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert fc.cache_key(backbone, {}, items) != before


def make_entry(folder, size=1000):
    fc._write_folder(folder, lambda tmp: (
        (tmp / "train.npy").write_bytes(b"x" * size), fc.write_meta(tmp, {})))


def test_eviction_killed_mid_delete_leaves_no_entry_that_looks_valid(tmp_path, monkeypatch):
    old, new = tmp_path / ("a" * 24), tmp_path / ("b" * 24)
    for folder in (old, new):
        make_entry(folder)
    os.utime(old / "meta.json", (1, 1))
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes one file, then the process dies
        files = sorted(p for p in os.scandir(path) if p.name != "meta.json")
        os.unlink(files[0].path)
        raise KeyboardInterrupt

    monkeypatch.setattr(fc.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        fc.evict(tmp_path, limit=1500)
    monkeypatch.setattr(fc.shutil, "rmtree", real_rmtree)

    assert not fc.is_complete(old) and fc.is_complete(new)
    fc.evict(tmp_path, limit=10**9)  # the next eviction finishes the interrupted delete
    assert [p.name for p in tmp_path.iterdir()] == [new.name]


def test_an_entry_missing_a_file_is_recomputed_not_read(tiny_recipe, tmp_path):
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache, epochs=1)
    train(raw, tmp_path / "a")
    [key] = entries(cache)
    (cache / "features" / key / "val.npy").unlink()  # what an in-place delete killed half way left behind
    assert not fc.is_complete(cache / "features" / key)
    train(raw, tmp_path / "b")
    assert entries(cache) == [key] and fc.is_complete(cache / "features" / key)


def test_cache_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        make_entry(tmp_path / ("a" * 24))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / ("a" * 24)).stat().st_mode) == 0o755


WIDE = 3 * 32 * 85


def _wide_backbone():
    """A weightless backbone with features (``WIDE``) wide next to its 32 px images: the cache dwarfs a batch."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((32, 85)), torch.nn.Flatten())


def _stage_features(backbone, items, cache, **over):
    from finetune.data import build_transform
    from finetune._distributed import DistInfo

    from finetune.data import ImageDataset

    transforms = dict(train_transform=build_transform(True, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3),
                      eval_transform=build_transform(False, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    views = over.get("views", 2)
    datasets = {"train": ImageDataset(items["train"], transforms["train_transform" if views else "eval_transform"], seed=3),
                "val": ImageDataset(items["val"], transforms["eval_transform"], seed=3)}
    kw = dict(datasets=datasets, views=2, key_parts={"test": 1}, cache_dir=cache, max_bytes=2**30, num_features=WIDE,
              dist=DistInfo(), device=torch.device("cpu"), amp_dtype=None, seed=3, batch_size=8, num_workers=0)
    return fc.stage_features(backbone, items, **{**kw, **over}), {**kw, **transforms}


def test_extraction_streams_into_float16_files_equal_to_extracting_in_ram(tmp_path, make_tiny_folder, monkeypatch):
    import tracemalloc

    import numpy as np

    from finetune.data import ImageDataset

    root = make_tiny_folder(tmp_path / "d", per_class=30)
    paths = sorted(root.rglob("*.png"))
    (paths[5]).write_bytes(b"not an image")  # an unreadable train image: its row is dropped
    items = {"train": [(p, i % 3) for i, p in enumerate(paths[:60])], "val": [(p, i % 3) for i, p in enumerate(paths[60:])]}
    backbone = _wide_backbone()
    peaks, real = [], fc._extract_share

    def measured(*a, **k):  # numpy's peak allocation while extracting
        tracemalloc.start()
        try:
            return real(*a, **k)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(fc, "_extract_share", measured)
    # a first small extraction does the imports (an unknown format loads every Pillow plugin)
    _stage_features(backbone, {"train": items["train"][:6], "val": items["val"][:2]}, tmp_path / "w")
    (train, val), kw = _stage_features(backbone, items, tmp_path / "c")
    cache_bytes = train.features.nbytes + val.features.nbytes
    assert train.features.dtype == np.float16 and train.features.shape == (2, 59, WIDE) and cache_bytes > 2e6
    # the old path held the float32 features of every view (2x the cache) plus their float16 copy in RAM
    assert peaks[1] < 0.4 * cache_bytes
    for view in range(2):
        dataset = ImageDataset(items["train"], kw["train_transform"], seed=3)
        dataset.set_epoch(view)
        feats, labels = fx.extract_features(backbone, dataset, device=torch.device("cpu"), amp_dtype=None,
                                            batch_size=8, num_workers=0)
        np.testing.assert_array_equal(train.features[view], feats.astype(np.float16))
        np.testing.assert_array_equal(train.labels, labels)
    feats, labels = fx.extract_features(backbone, ImageDataset(items["val"], kw["eval_transform"], seed=3),
                                        device=torch.device("cpu"), amp_dtype=None, batch_size=8, num_workers=0)
    np.testing.assert_array_equal(val.features[0], feats.astype(np.float16))
    np.testing.assert_array_equal(val.labels, labels)


def _extract_on_rank(rank, world, port, items, cache):
    import torch.distributed as torch_dist

    from finetune._distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _stage_features(_wide_backbone(), items, cache, views=1,
                        dist=DistInfo(rank=rank, local_rank=rank, world_size=world, local_world_size=world))
    finally:
        torch_dist.destroy_process_group()


def test_ddp_processes_share_the_extraction_and_make_the_single_process_cache(tmp_path, make_tiny_folder):
    import json
    import socket

    import numpy as np
    import torch.multiprocessing as mp

    root = make_tiny_folder(tmp_path / "d", per_class=8)
    paths = sorted(root.rglob("*.png"))
    paths[13].write_bytes(b"not an image")  # in rank 1's half of the train rows
    items = {"train": [(p, i % 3) for i, p in enumerate(paths[:16])], "val": [(p, i % 3) for i, p in enumerate(paths[16:])]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_extract_on_rank, args=(2, port, items, tmp_path / "ddp"), nprocs=2, start_method="fork")
    (train, val), _ = _stage_features(_wide_backbone(), items, tmp_path / "one", views=1)

    [folder] = [p for p in (tmp_path / "ddp" / "features").iterdir() if not p.name.startswith(".")]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["extracted_by_rank"] == [8 + 4, 7 + 4]  # train 16 (one unreadable) and val 8 rows, halved
    np.testing.assert_array_equal(np.load(folder / "train.npy"), train.features)
    np.testing.assert_array_equal(np.load(folder / "train_labels.npy"), train.labels)
    np.testing.assert_array_equal(np.load(folder / "val.npy"), val.features)
    np.testing.assert_array_equal(np.load(folder / "val_labels.npy"), val.labels)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (Linux's /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_extraction_hands_written_cache_pages_back_so_rss_does_not_grow_with_the_cache(tmp_path):
    import numpy as np

    width, n = 2048, 4096  # a 16 MiB float16 map
    rows = np.lib.format.open_memmap(tmp_path / "train.npy", "w+", np.float16, (1, n, width))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.full((width,), float(i % 1000)), i

    written = fx.extract_into(rows[0], torch.nn.Identity(), Rows(), device=torch.device("cpu"), amp_dtype=None,
                              batch_size=128, num_workers=0, release_bytes=1 << 20)
    # without the release every page written stays resident: 16 MiB
    assert _mapped_rss_kb(tmp_path / "train.npy") < 3 * 1024
    np.testing.assert_array_equal(written, np.arange(n))
    del rows
    saved = np.load(tmp_path / "train.npy")[0]  # nothing lost: every row reads back from the file
    np.testing.assert_array_equal(saved, np.repeat((np.arange(n) % 1000)[:, None], width, axis=1).astype(np.float16))


@pytest.mark.skipif(not getattr(fx._LIBC, "malloc_trim", None) or not os.path.exists("/proc/self/statm"),
                    reason="glibc's malloc_trim and Linux's /proc/self/statm")
def test_trim_heap_hands_back_memory_that_threads_freed_between_live_blocks():
    """Threads (the fingerprinting pool) allocate in malloc arenas of their own; what they free between
    blocks still alive stays resident until the heap is trimmed."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    def churn(_):
        blocks = [bytes(8192) for _ in range(1500)]  # 12 MB per thread, below glibc's mmap threshold
        return blocks[::16]  # one block in 16 stays alive: the freed runs between them can't shrink the heap

    with ThreadPoolExecutor(4) as pool:
        kept = list(pool.map(churn, range(4)))
    before = rss_mb()
    fx.trim_heap()
    assert before - rss_mb() > 10  # of the ~45 MB freed
    assert len(kept) == 4
