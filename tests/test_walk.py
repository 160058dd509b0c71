"""Every CLI command that reads a dataset, a manifest or a checkpoint, walked with hostile input (issue 22):
a manifest that is not UTF-8, a tampered checkpoint, a class folder the process cannot list. Each is one
line naming the problem, exit status 2, no traceback and nothing written.

The unlistable folder needs a process without root's file-permission bypass: the walk runs
tests/unprivileged_walk.py in a pytest subprocess whose capabilities setpriv drops (CI runs as root).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.walk import (
    CHECKPOINT_COMMANDS,
    DATA_COMMANDS,
    TAMPERS,
    argv_with,
    check_one_line,
    snapshot,
    workspace,
)

LATIN1_MANIFEST = "path,class,split\ncircle/000.png,caf\xe9,train\n".encode("latin-1")

UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                "--inh-caps", "-dac_override,-dac_read_search"]
"""A command prefix that drops the capabilities letting root read any folder (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH): under it, ``chmod 000`` stops root as it stops any user."""


@pytest.mark.parametrize("argv", [argv for _, argv in DATA_COMMANDS], ids=[i for i, _ in DATA_COMMANDS])
def test_a_manifest_that_is_not_utf8_is_one_line_naming_the_byte_and_writes_nothing(argv, tmp_path, tiny_recipe,
                                                                                     finetune_cli):
    workspace(tmp_path, tiny_recipe)
    (tmp_path / "tiny" / "latin1.csv").write_bytes(LATIN1_MANIFEST)
    argv = argv_with(argv, "tiny/latin1.csv")
    if argv[0] in ("train", "lr-find") and "recipe.yaml" in argv:  # a manifest is data.manifest, not data.root
        argv = tuple(a.replace("data.root=tiny/latin1.csv", "data.manifest=tiny/latin1.csv") for a in argv)
        argv = (*argv, "--set", "data.root=null", "--set", "data.val=null", "--set", "data.test=null")
    before = snapshot(tmp_path)

    done = finetune_cli(*argv, cwd=tmp_path, env={"FINETUNE_CACHE": str(tmp_path / "default-cache")})

    check_one_line(done, "tiny/latin1.csv is not UTF-8 text: byte 35 (line 2) is b'\\xe9'")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [argv for _, argv in CHECKPOINT_COMMANDS], ids=[i for i, _ in CHECKPOINT_COMMANDS])
@pytest.mark.parametrize("tamper", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_a_tampered_checkpoint_is_one_line_naming_the_field_and_writes_nothing(argv, tamper, tmp_path, tiny_recipe,
                                                                              finetune_cli):
    _, changes, expect = tamper
    workspace(tmp_path, tiny_recipe, checkpoint_changes=changes)
    before = snapshot(tmp_path)

    done = finetune_cli(*argv, cwd=tmp_path, env={"FINETUNE_CACHE": str(tmp_path / "default-cache")})

    check_one_line(done, expect)
    assert "checkpoint.json" in done.stderr
    assert snapshot(tmp_path) == before


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path, make_tiny_folder):
    from finetune.data import Manifest

    make_tiny_folder(tmp_path, per_class=2)
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfpath,class,split\ncircle/000.png,circle,train\n")

    assert [tuple(r) for r in Manifest.read_csv(tmp_path / "m.csv").rows] == [("circle/000.png", "circle", "train")]


def _setpriv_works(folder: Path) -> bool:
    """Whether the unprivileged prefix really stops this process's children from listing ``folder``."""
    if shutil.which("setpriv") is None:
        return False
    done = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(folder)],
                          capture_output=True, text=True)
    return done.returncode != 0 and "PermissionError" in done.stderr


@pytest.mark.slow
def test_every_command_refuses_a_class_folder_it_cannot_list_in_one_line(tmp_path):
    """tests/unprivileged_walk.py, in a process that cannot list a chmod-000 folder (a root test run drops its
    capabilities with setpriv; another user needs nothing)."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o000)
    try:
        prefix = [] if os.geteuid() != 0 else UNPRIVILEGED
        if prefix and not _setpriv_works(probe):
            if os.environ.get("CI"):
                pytest.fail("setpriv cannot drop root's capabilities here: the unlistable-folder walk cannot run")
            pytest.skip("running as root without a working setpriv: root lists every folder")
    finally:
        probe.chmod(0o700)
    cases = Path(__file__).with_name("unprivileged_walk.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_UNPRIVILEGED_WALK": "1"}
    done = subprocess.run([*prefix, sys.executable, "-m", "pytest", str(cases), "-q", "-p", "no:xdist", "-p",
                           "no:cacheprovider", "--basetemp", str(tmp_path / "inner"), "-rfEs"],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "skipped" not in summary and "passed" in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 12, summary
