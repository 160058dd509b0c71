import os
import re

import pytest

from finetune.data import Manifest, ManifestRow
from finetune.errors import FinetuneError

HEADER = "path,class,split\n"


def sample_manifest(root):
    return Manifest(
        root,
        [
            ManifestRow("test/CROW/1.jpg", "CROW", "test"),
            ManifestRow("train/BALD EAGLE/1.jpg", "BALD EAGLE", "train"),
            ManifestRow("train/CROW/1.jpg", "CROW", "train"),
            ManifestRow('train/CROW/with,comma "q".jpg', "CROW", "train"),
            ManifestRow("valid/BALD EAGLE/2.jpg", "BALD EAGLE", "val"),
        ],
    )


def write(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_round_trip_keeps_rows_classes_and_defaults_root_to_the_csv_folder(tmp_path):
    manifest = sample_manifest(tmp_path / "elsewhere")
    path = manifest.write_csv(tmp_path / "sub" / "m.csv")
    again = Manifest.read_csv(path)
    assert again.rows == manifest.rows
    assert again.classes == ["BALD EAGLE", "CROW"]
    assert again.root == tmp_path / "sub"
    assert Manifest.read_csv(path, root=tmp_path / "data").root == tmp_path / "data"


def test_csv_is_sorted_by_split_class_path_with_unix_newlines(tmp_path):
    text = sample_manifest(tmp_path).write_csv(tmp_path / "m.csv").read_bytes().decode()
    assert text == (
        HEADER
        + "train/BALD EAGLE/1.jpg,BALD EAGLE,train\n"
        + "train/CROW/1.jpg,CROW,train\n"
        + '"train/CROW/with,comma ""q"".jpg",CROW,train\n'  # CSV quoting
        + "valid/BALD EAGLE/2.jpg,BALD EAGLE,val\n"
        + "test/CROW/1.jpg,CROW,test\n"
    )


def test_items_give_absolute_paths_and_sorted_class_indices(tmp_path):
    manifest = sample_manifest(tmp_path)
    assert manifest.splits() == ["train", "val", "test"]
    assert manifest.items("val") == [(tmp_path / "valid/BALD EAGLE/2.jpg", 0)]
    assert [label for _, label in manifest.items("train")] == [0, 1, 1]


def test_items_of_an_absent_split_is_an_error(tmp_path):
    manifest = Manifest(tmp_path, [ManifestRow("a/1.jpg", "a", "train")])
    with pytest.raises(FinetuneError, match="no 'val' split .*has: train"):
        manifest.items("val")


def test_counts_list_every_class_in_every_present_split(tmp_path):
    assert sample_manifest(tmp_path).counts() == {
        "train": {"BALD EAGLE": 1, "CROW": 2},
        "val": {"BALD EAGLE": 1, "CROW": 0},
        "test": {"BALD EAGLE": 0, "CROW": 1},
    }


def test_valid_and_validation_split_names_are_read_as_val(tmp_path):
    path = write(tmp_path, HEADER + "a/1.jpg,a,valid\na/2.jpg,a,validation\na/3.jpg,a,train\n")
    assert [r.split for r in Manifest.read_csv(path).rows] == ["train", "val", "val"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("/etc/passwd,a,train", "m.csv:2: path '/etc/passwd' is absolute"),
        ("C:\\data\\x.jpg,a,train", "is absolute"),
        ("../outside.jpg,a,train", "climbs out of the dataset root"),
        ("a/../../outside.jpg,a,train", "climbs out of the dataset root"),
        ("a\\..\\..\\x.jpg,a,train", "climbs out of the dataset root"),
        (",a,train", "m.csv:2: empty path"),
        ("a/1.jpg,,train", "empty class"),
        ("a/1.jpg,a,holdout", "unknown split 'holdout'"),
        ("a/1.jpg,a", "expected 3 fields"),
    ],
)
def test_invalid_rows_are_rejected_naming_the_line(tmp_path, row, message):
    path = write(tmp_path, HEADER + row + "\n")
    with pytest.raises(FinetuneError, match=re.escape(message)):
        Manifest.read_csv(path)


def test_a_path_listed_twice_is_rejected(tmp_path):
    path = write(tmp_path, HEADER + "a/1.jpg,a,train\na/1.jpg,a,test\n")
    with pytest.raises(FinetuneError, match="lists 'a/1.jpg' 2 times"):
        Manifest.read_csv(path)


@pytest.mark.parametrize("text", ["", "file,label\n", "path,class,split\n"])
def test_a_file_without_header_or_rows_is_rejected(tmp_path, text):
    with pytest.raises(FinetuneError, match="not a manifest|lists no image"):
        Manifest.read_csv(write(tmp_path, text))


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(FinetuneError, match="cannot read manifest"):
        Manifest.read_csv(tmp_path / "nope.csv")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = sample_manifest(tmp_path).write_csv(tmp_path / "m.csv")
    old = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(FinetuneError, match=f"^cannot write {path}: disk full$"):
        Manifest(tmp_path, [ManifestRow("x/1.jpg", "x", "train")]).write_csv(path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]
