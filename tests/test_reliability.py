"""Regression tests for what an adversarial pass found (issue 22): each failed before its fix.

Blank images called copies, checkpoints with duplicate classes or a missing weights file, misleading
messages, and a kill -9 inside `finetune data audit`'s write. The command walks (an unlistable folder, a
non-UTF-8 manifest, a tampered checkpoint through every command) are in tests/test_walk.py.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data import Manifest, ManifestRow, prepare_manifest

from tests.conftest import write_tiny_folder
from tests.walk import check_one_line, snapshot, tiny_checkpoint

CLI_ENV = {"FINETUNE_CACHE": "default-cache"}


# ------------------------------------------------------------------------- blank images are not copies

def blank_images() -> dict[str, np.ndarray]:
    """The adversarial pass's flat images, each decoded as training decodes it, plus two real copies: a
    40×40 grey image saved twice (equal pixels)."""
    red = np.zeros((1, 1, 3), np.uint8) + np.array([255, 0, 0], np.uint8)
    grey = np.full((40, 40, 3), 128, np.uint8)
    green = np.zeros((40, 40, 3), np.uint8) + np.array([0, 200, 0], np.uint8)
    return {"red": red, "grey": grey, "green": green, "grey-again": grey.copy()}


def write_blank_dataset(root: Path) -> Path:
    """A pre-split folder whose train/ and test/ hold the flat images (a palette GIF and a float TIFF too),
    each in another class, among ordinary tiny images."""
    write_tiny_folder(root / "train", per_class=6, seed=0)
    write_tiny_folder(root / "val", per_class=3, seed=1)
    write_tiny_folder(root / "test", per_class=3, seed=2)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "train" / "circle" / "red.png")
    Image.new("RGB", (40, 40), (128, 128, 128)).save(root / "test" / "square" / "grey.png")
    Image.new("RGB", (40, 40), (0, 200, 0)).save(root / "test" / "stripes" / "green.png")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)  # blue: not the float TIFF's black (equal pixels would be copies)
    palette.save(root / "train" / "square" / "palette.gif")
    Image.fromarray(np.full((40, 40), 0.25, np.float32), mode="F").save(root / "test" / "circle" / "float.tif")
    return root


def test_blank_images_are_no_copies_of_each_other_unless_their_pixels_agree():
    from finetune.data import flat_copies, flat_signature, thumbnail_views, view_similarity

    images = blank_images()
    signatures = {name: flat_signature(image) for name, image in images.items()}
    assert signatures["red"] == (1, 1, 255, 0, 0) and signatures["green"] == (40, 40, 0, 200, 0)
    assert flat_copies(signatures["grey"], signatures["grey-again"])
    for a in ("red", "grey", "green"):
        for b in ("red", "grey", "green"):
            if a != b:
                assert not flat_copies(signatures[a], signatures[b]), (a, b)
                # before the fix, any two flat images scored 1.0
                assert view_similarity(thumbnail_views(images[a]), thumbnail_views(images[b])) == 0.0
    noisy = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert flat_signature(noisy) is None


def test_the_training_leak_check_is_silent_about_blank_images_of_different_colours(tmp_path, caplog):
    root = write_blank_dataset(tmp_path / "ds")

    with caplog.at_level(logging.WARNING):
        prepare_manifest(root, scan_cache=False)

    assert not [r for r in caplog.records if "leakage" in r.getMessage()], caplog.text


def test_the_training_leak_check_still_reports_one_blank_image_in_two_splits(tmp_path, caplog):
    root = write_blank_dataset(tmp_path / "ds")
    Image.new("RGB", (40, 40), (0, 200, 0)).save(root / "train" / "stripes" / "green-copy.png", compress_level=1)

    with caplog.at_level(logging.WARNING):
        prepare_manifest(root, scan_cache=False)

    leaks = [r.getMessage() for r in caplog.records if "near-identical" in r.getMessage()]
    assert len(leaks) == 1 and "test/stripes/green.png" in leaks[0] and "train/stripes/green-copy.png" in leaks[0]


def test_the_audit_lists_blank_images_on_their_own_and_groups_only_equal_ones(tmp_path):
    from finetune.audit import audit_features, write_audit

    images = {**blank_images(), "noise": np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)}
    names = list(images)
    splits = {"red": "train", "grey": "test", "green": "val", "grey-again": "train", "noise": "train"}
    manifest = Manifest(tmp_path, [ManifestRow(f"{n}.png", f"class-{i % 2}", splits[n]) for i, n in enumerate(names)])
    order = [names.index(r.path[:-4]) for r in manifest.rows]
    features = np.ones((len(names), 8), np.float32)  # every embedding alike: the pixels must decide

    audit = audit_features(manifest, features, load=lambda i: images[names[order[i]]])

    assert [sorted(g["paths"]) for g in audit.near_duplicates] == [["grey-again.png", "grey.png"]]
    assert audit.near_duplicates[0]["leak"]
    assert {b["path"]: b["colour"] for b in audit.blank_images} == {
        "red.png": "#ff0000", "grey.png": "#808080", "green.png": "#00c800", "grey-again.png": "#808080"}
    assert audit.summary()["blank_images"] == 4
    files = write_audit(audit, tmp_path / "audit")
    blank_csv = Path(files["blank_images.csv"]).read_text().splitlines()
    assert blank_csv[0] == "path,split,class,colour" and len(blank_csv) == 5
    near = Path(files["near_duplicates.csv"]).read_text().splitlines()
    assert len(near) == 3 and not any("red.png" in line or "green.png" in line for line in near)


# --------------------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_with_duplicate_class_names_is_refused(tmp_path):
    from finetune.models.checkpoint import load_checkpoint
    from finetune.errors import FinetuneError

    tiny_checkpoint(tmp_path, {"classes": ["a", "a"]})

    with pytest.raises(FinetuneError, match="classes names 'a' more than once"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_missing_frozen_weights_file_is_named_not_the_model_file(tmp_path):
    from finetune.models.checkpoint import FROZEN_FILE, WeightsWriter, load_checkpoint, save_checkpoint
    from finetune.errors import FinetuneError
    from finetune.models import create_model

    model = create_model("test_resnet", 2, head="linear")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    preprocessing = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                     "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    save_checkpoint(tmp_path / "ck", model, {"classes": ["a", "b"], "preprocessing": preprocessing}, writer=WeightsWriter())
    (tmp_path / "ck" / FROZEN_FILE).unlink()

    with pytest.raises(FinetuneError) as error:
        load_checkpoint(tmp_path / "ck")
    assert str(error.value).startswith(f"{tmp_path / 'ck' / FROZEN_FILE} is missing: ")


# ------------------------------------------------------------------------------------------ messages

def test_the_bad_files_line_of_a_run_names_the_report_that_stays(tiny_recipe, tmp_path, finetune_cli):
    import yaml

    (Path(tiny_recipe["data"]["root"]) / "circle" / "broken.png").write_bytes(b"not a png")
    tiny_recipe["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": False}]
    tiny_recipe["output"] = {"evaluate_test": False}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))

    done = finetune_cli("train", "r.yaml", "--out", "run", cwd=tmp_path)

    assert done.returncode == 0, done.stderr[-2000:]
    named = [line for line in done.stderr.splitlines() if "bad_files.csv" in line]
    assert named and all(".setup.tmp" not in line for line in named), named
    assert f"listed in {Path('run') / 'bad_files.csv'}" in named[0]
    assert (tmp_path / "run" / "bad_files.csv").read_text().count("broken.png") == 1


def test_lr_find_refuses_one_update_at_the_argument(tmp_path, finetune_cli):
    done = finetune_cli("lr-find", "recipe.yaml", "--updates", "1", cwd=tmp_path)

    assert done.returncode == 2
    assert "argument --updates: must be 2 or more (got 1)" in done.stderr


def test_one_image_per_class_with_data_val_set_says_why_there_is_no_val_split(tiny_recipe, tmp_path, finetune_cli):
    import yaml

    root = write_tiny_folder(tmp_path / "one", per_class=1)
    tiny_recipe["data"]["root"] = str(root)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))

    done = finetune_cli("train", "r.yaml", "--out", "run", cwd=tmp_path)

    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert "data.val is 0.25, but no class has enough usable images" in error and "give data.val" not in error


def test_a_folder_named_like_an_image_is_listed_as_a_bad_file(tmp_path):
    from finetune.data import inspect_dataset

    root = write_tiny_folder(tmp_path / "ds", per_class=3)
    (root / "circle" / "dir.png").mkdir()
    (root / "circle" / "dir.png" / "inside.png").write_bytes((root / "circle" / "000.png").read_bytes())

    report = inspect_dataset(root, scan_cache=False)

    assert {"path": "circle/dir.png", "reason": "not a regular file (a folder)"} in report["bad_files"]
    assert report["counts"]["all"]["circle"] == 3  # the folder's contents are not taken as images either


@pytest.mark.parametrize("out", ["ds", "ds/circle", "ds/circle/audit"])
def test_data_audit_refuses_an_out_folder_inside_the_data(out, tmp_path, finetune_cli):
    write_tiny_folder(tmp_path / "ds", per_class=3)
    before = snapshot(tmp_path)

    done = finetune_cli("data", "audit", "ds", "--out", out, "--backbone", "test_resnet", "--pretrained", "none",
                        cwd=tmp_path, env=CLI_ENV)

    check_one_line(done, f"--out {out} is inside the data root ds")
    assert snapshot(tmp_path) == before


def test_data_audit_refuses_to_replace_a_folder_holding_other_files(tmp_path, finetune_cli):
    write_tiny_folder(tmp_path / "ds", per_class=3)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")

    done = finetune_cli("data", "audit", "ds", "--out", "notes", "--backbone", "test_resnet", "--pretrained", "none",
                        cwd=tmp_path, env=CLI_ENV)

    check_one_line(done, "--out notes holds files that are not an audit's (mine.txt)")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ kill -9 in the write

KILL_INSIDE_WRITE = textwrap.dedent("""
    # Fault injection: write an audit whose 2nd file write sends this process SIGKILL.
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from finetune.audit import audit_features, write_audit
    from finetune.data import Manifest, ManifestRow

    out, label, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rows = [ManifestRow(f"{i}.png", "ab"[i % 2], "train") for i in range(40)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    audit = audit_features(Manifest(".", rows), rng.normal(size=(40, 8)), load=lambda i: images[i])
    audit.settings["label"] = label
    if kill_at:
        real, calls = Path.write_text, []
        def write_text(self, *args, **kwargs):
            calls.append(self)
            if len(calls) == kill_at:
                real(self, args[0][: len(args[0]) // 2], **kwargs)  # half a file, then the kill
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)
        Path.write_text = write_text
    write_audit(audit, out)
""")


@pytest.mark.slow
def test_a_kill_inside_the_audit_write_leaves_the_previous_audit_whole(tmp_path):
    def audit(label: str, kill: int) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-c", KILL_INSIDE_WRITE, str(tmp_path / "audit"), label, str(kill)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300).returncode

    assert audit("first", 0) == 0
    first = snapshot(tmp_path / "audit")

    for kill_at in (1, 3, 5):  # killed inside the first, a middle and a late file write
        assert audit(f"killed at write {kill_at}", kill_at) == -signal.SIGKILL
        assert snapshot(tmp_path / "audit") == first, kill_at  # every file of the first audit, none of the killed one
    assert "first" in (tmp_path / "audit" / "audit.html").read_text()
    assert audit("third", 0) == 0  # and the next audit cleans up what the kills left
    assert "third" in (tmp_path / "audit" / "audit.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]
