"""Checkpoint folders: the atomic swap, recovery from a crash inside it, and permissions."""
import os
import stat

import pytest

import finetune.checkpoint as checkpoint
from finetune.checkpoint import recover_dir, write_dir_atomic
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
