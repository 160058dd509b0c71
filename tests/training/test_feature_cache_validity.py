"""The feature cache is reused only when everything its features depend on is unchanged, and an entry
counts only when complete: evicting or killing never leaves one that a later run takes as valid."""
import copy
import os
import shutil
import stat

import pytest
import timm
import torch
from safetensors.torch import save_file

import finetune.training.feature_cache as fc
from finetune.config import parse_recipe
from finetune.training.runner import run_training


def head_only(raw, cache):
    raw = copy.deepcopy(raw)
    raw["stages"] = [{"name": "head", "epochs": 1, "train": "head"}]
    raw["training"]["cache_dir"] = str(cache)
    raw["output"] = {"evaluate_test": False}
    return raw


def train(raw, run_dir):
    return run_training(parse_recipe(raw), raw, run_dir=run_dir, quiet=True)


def entries(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def weights_file(path, seed):
    torch.manual_seed(seed)
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(path))
    return str(path)


def test_cache_is_not_reused_for_other_backbone_kwargs_or_other_weights_with_the_same_seed(tiny_recipe, tmp_path):
    cache = tmp_path / "c"
    raw = head_only(tiny_recipe, cache)
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
    raw = head_only(tiny_recipe, cache)
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
    raw = head_only(tiny_recipe, cache)
    train(raw, tmp_path / "a")
    [key] = entries(cache)
    (cache / key / "val.npy").unlink()  # what an in-place delete killed half way left behind
    assert not fc.is_complete(cache / key)
    train(raw, tmp_path / "b")
    assert entries(cache) == [key] and fc.is_complete(cache / key)


def test_cache_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        make_entry(tmp_path / ("a" * 24))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / ("a" * 24)).stat().st_mode) == 0o755
