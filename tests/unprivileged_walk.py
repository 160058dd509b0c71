"""Run by tests/test_walk.py in a process that cannot list a ``chmod 000`` folder (never collected on its
own: its name is not test_*.py). Regression (issue 22): ``os.walk`` skipped a class folder it could not
list, so ``data inspect`` said "classes: 2" and ``train`` trained on 2 of 3 classes, exit 0."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.walk import DATA_COMMANDS, FOLDER_ONLY, argv_with, check_one_line, snapshot, workspace

pytestmark = pytest.mark.skipif(not os.environ.get("FINETUNE_UNPRIVILEGED_WALK"),
                                reason="run by tests/test_walk.py in an unprivileged process")


@pytest.fixture
def unlistable(tmp_path, tiny_recipe):
    """The workspace with class folder ``tiny/square`` (or a folder inside it) made unlistable; put back after."""
    workspace(tmp_path, tiny_recipe)
    folders = []

    def make(relative: str):
        folder = tmp_path / relative
        folder.mkdir(parents=True, exist_ok=True)
        if relative != "tiny/square":
            shutil.copy(tmp_path / "tiny" / "square" / "000.png", folder / "000.png")
        folder.chmod(0o000)
        folders.append(folder)
        with pytest.raises(PermissionError):  # the test means nothing if this process can list it
            os.listdir(folder)
        return snapshot(tmp_path)

    yield make
    for folder in folders:
        folder.chmod(0o755)


@pytest.mark.parametrize("argv", [a for _, a in DATA_COMMANDS + FOLDER_ONLY], ids=[i for i, _ in DATA_COMMANDS + FOLDER_ONLY])
def test_a_class_folder_that_cannot_be_listed_is_one_line_naming_it(argv, unlistable, tmp_path, finetune_cli):
    before = unlistable("tiny/square")

    done = finetune_cli(*argv_with(argv, "tiny"), cwd=tmp_path, env={"FINETUNE_CACHE": str(tmp_path / "default-cache")})

    check_one_line(done, "cannot list folder tiny/square: Permission denied")
    assert snapshot(tmp_path) == before


def test_a_sub_folder_of_a_class_that_cannot_be_listed_is_named_too(unlistable, tmp_path, finetune_cli):
    before = unlistable("tiny/square/burst")

    done = finetune_cli("data", "inspect", "tiny", cwd=tmp_path, env={"FINETUNE_CACHE": str(tmp_path / "cache")})

    check_one_line(done, "cannot list folder tiny/square/burst: Permission denied")
    assert snapshot(tmp_path) == before


def test_a_dataset_root_that_cannot_be_listed_is_named(unlistable, tmp_path, finetune_cli):
    before = unlistable("other")

    done = finetune_cli("data", "inspect", "other", cwd=tmp_path, env={"FINETUNE_CACHE": str(tmp_path / "cache")})

    check_one_line(done, "cannot list folder other: Permission denied")
    assert snapshot(tmp_path) == before
