"""Checkpoint folders: the atomic swap, recovery from a crash inside it, and permissions."""
import os
import stat

import pytest

import finetune.models.checkpoint as checkpoint
from finetune.models.checkpoint import recover_dir, write_dir_atomic
from finetune.errors import FinetuneError


def write_text(text):
    return lambda folder: (folder / "checkpoint.json").write_text(text)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def fail_rename_into(monkeypatch, name):
    """Make ``os.replace`` raise when it would move a temporary folder onto ``name``: the crash between
    the two renames of a swap."""
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == name and ".tmp-" in os.path.basename(src):
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)


def test_a_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    path = tmp_path / "last"
    write_dir_atomic(path, write_text("first"))
    fail_rename_into(monkeypatch, "last")
    with pytest.raises(FinetuneError, match="^cannot write .*last: simulated crash$"):
        write_dir_atomic(path, write_text("second"))
    assert (path / "checkpoint.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_swap_killed_between_its_renames_is_recovered_from_the_old_copy(tmp_path):
    path = tmp_path / "last"
    write_dir_atomic(path, write_text("first"))
    os.replace(path, tmp_path / "last.old")  # the first rename of the next swap; then SIGKILL
    (tmp_path / ".last.tmp-x1y2").mkdir()
    (tmp_path / ".last.tmp-x1y2" / "checkpoint.json").write_text("second")

    assert recover_dir(path) == path
    assert (path / "checkpoint.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_recovery_removes_interrupted_temporary_folders_and_a_stale_old_copy(tmp_path):
    path = tmp_path / "best"
    write_dir_atomic(path, write_text("current"))
    (tmp_path / ".best.tmp-abc123").mkdir()  # a writer killed before its swap
    (tmp_path / ".best.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "best.old").mkdir()  # killed after the swap, before the old copy was deleted
    (tmp_path / "best.old" / "checkpoint.json").write_text("previous")
    (tmp_path / ".last.tmp-keep").mkdir()  # another checkpoint's: not ours to remove

    recover_dir(path)

    assert (path / "checkpoint.json").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.tmp-keep", "best"]


def test_next_swap_after_an_interrupted_one_keeps_a_checkpoint_at_every_step(tmp_path, monkeypatch):
    path = tmp_path / "last"
    write_dir_atomic(path, write_text("first"))
    fail_rename_into(monkeypatch, "last")
    with pytest.raises(FinetuneError):
        write_dir_atomic(path, write_text("second"))
    monkeypatch.undo()
    write_dir_atomic(path, write_text("third"))
    assert (path / "checkpoint.json").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_checkpoint_folders_honour_the_umask(tmp_path, umask_022):
    path = write_dir_atomic(tmp_path / "ckpt", write_text("x"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "checkpoint.json").stat().st_mode) == 0o644


# ------------------------------------------------------------------ checkpoints checked against their model

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3-class test_resnet + linear head checkpoint (written once; tests edit copies)."""
    from finetune.models.checkpoint import save_checkpoint
    from finetune.models import create_model

    model = create_model("test_resnet", 3, head="linear")
    meta = {"classes": ["a", "b", "c"], "preprocessing": {"input_size": [3, 32, 32]}}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", model, meta)


def edited(saved, tmp_path, weights=None, **meta_changes):
    """A copy of ``saved`` with ``weights`` (bytes, or None to delete the file) and checkpoint.json changes."""
    import json
    import shutil

    folder = shutil.copytree(saved, tmp_path / "best")
    if weights is not ...:
        if weights is None:
            (folder / "model.safetensors").unlink()
        else:
            path = folder / "model.safetensors"
            path.write_bytes(weights(path.read_bytes()))
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta.update(meta_changes)
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("weights, meta, expected", [
    (None, {}, r"model\.safetensors is missing"),
    (lambda b: b"", {}, r"model\.safetensors is not a readable safetensors file"),
    (lambda b: b[: len(b) // 2], {}, r"model\.safetensors is not a readable safetensors file"),
    (..., {"backbone": "test_efficientnet"}, r"model\.safetensors does not fit .*backbone test_efficientnet"),
    (..., {"num_classes": 5, "classes": list("abcde")}, r"does not fit .*5 classes.*head\.1\.weight"),
    (..., {"classes": list("abcde")}, r"checkpoint\.json lists 5 classes for a model with 3 outputs"),
    (..., {"backbone_kwargs": {"in_chans": 1}}, r"does not fit .*backbone_kwargs"),
    (..., {"backbone_kwargs": {"no_such_option": 1}}, r"checkpoint\.json: backbone_kwargs .*no_such_option"),
    (..., {"backbone": "no_such_backbone"}, r"checkpoint\.json: .*unknown timm backbone 'no_such_backbone'"),
    (..., {"classes": "abc"}, r"checkpoint\.json: classes must be a list of names"),
])
def test_a_checkpoint_that_disagrees_with_its_model_is_refused_in_one_line_naming_the_file(
        saved, tmp_path, weights, meta, expected):
    from finetune.models.checkpoint import load_checkpoint
    from finetune.errors import FinetuneError

    folder = edited(saved, tmp_path, weights, **meta)
    with pytest.raises(FinetuneError, match=expected) as e:
        load_checkpoint(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_an_intact_checkpoint_still_loads(saved):
    from finetune.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(saved)
    assert meta["classes"] == ["a", "b", "c"] and model.head[1].out_features == 3


def test_a_frozen_backbone_is_written_once_and_each_checkpoint_stays_self_contained(tmp_path):
    import shutil

    import torch

    from finetune.models.checkpoint import FROZEN_FILE, WEIGHTS_FILE, WeightsWriter, load_checkpoint, save_checkpoint
    from finetune.models import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head={"name": "spinal", "width": 16}, pretrained=False)
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=0.1)
    meta = {"classes": ["a", "b", "c"], "preprocessing": {}}
    writer = WeightsWriter()
    inodes = []
    for epoch in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        save_checkpoint(tmp_path / "last", model, meta, writer=writer)
        if epoch == 1:
            save_checkpoint(tmp_path / "best", model, meta, writer=writer)
        inodes.append(os.stat(tmp_path / "last" / FROZEN_FILE).st_ino)
    assert inodes[0] == inodes[1] == inodes[2] == os.stat(tmp_path / "best" / FROZEN_FILE).st_ino  # written once
    backbone_bytes = os.path.getsize(tmp_path / "last" / FROZEN_FILE)
    assert os.path.getsize(tmp_path / "last" / WEIGHTS_FILE) < backbone_bytes / 4  # the head alone

    # the backbone changes (a later stage trains it): a new frozen file holds its new values
    with torch.no_grad():
        model.backbone.conv1[0].weight.mul_(2)
    save_checkpoint(tmp_path / "last", model, meta, writer=writer)
    loaded, _ = load_checkpoint(tmp_path / "last")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # BatchNorm statistics change inside its kernel (no version bump): the new ones are written
    model.backbone.train()
    model(torch.randn(4, 3, 32, 32))
    save_checkpoint(tmp_path / "last", model, meta, writer=writer)
    loaded, _ = load_checkpoint(tmp_path / "last")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # best loads alone: without the other folder or the writer
    expected_best = {k: v.clone() for k, v in load_checkpoint(tmp_path / "best")[0].state_dict().items()}
    shutil.rmtree(tmp_path / "last")
    alone, _ = load_checkpoint(tmp_path / "best")
    assert all(torch.equal(alone.state_dict()[k], v) for k, v in expected_best.items())
    assert not torch.equal(alone.state_dict()["backbone.conv1.0.weight"], model.state_dict()["backbone.conv1.0.weight"])


def test_a_stage_that_trains_everything_writes_one_weights_file(tmp_path):
    import torch

    from finetune.models.checkpoint import FROZEN_FILE, WeightsWriter, save_checkpoint
    from finetune.models import create_model

    model = create_model("test_resnet", 3, head="linear", pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = WeightsWriter()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        save_checkpoint(tmp_path / "last", model, {"classes": ["a", "b", "c"], "preprocessing": {}}, writer=writer)
        assert not (tmp_path / "last" / FROZEN_FILE).exists()
