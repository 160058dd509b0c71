import shutil

import pytest

from finetune.data import discover, find_images
from finetune.errors import FinetuneError

BIRDS = ["AFRICAN CROWNED CRANE", "BALD EAGLE", "CROW"]


def test_bird225_layout_is_pre_split_with_valid_read_as_val(bird_root):
    found = discover(bird_root)
    assert found.layout == "pre-split"
    assert found.split_dirs == {"train": "train", "val": "valid", "test": "test"}
    assert found.classes == BIRDS
    assert {s: {c: len(p) for c, p in per.items()} for s, per in found.images.items()} == {
        "train": dict.fromkeys(BIRDS, 6),
        "val": dict.fromkeys(BIRDS, 2),
        "test": dict.fromkeys(BIRDS, 2),
    }
    assert found.images["val"]["BALD EAGLE"][0] == "valid/BALD EAGLE/1.jpg"


@pytest.mark.parametrize("val_name", ["val", "validation", "Valid"])
def test_every_validation_folder_name_is_recognised(bird_root, val_name):
    (bird_root / "valid").rename(bird_root / val_name)
    assert discover(bird_root).split_dirs["val"] == val_name


def test_pre_split_without_test_folder_has_train_and_val_only(bird_root):
    shutil.rmtree(bird_root / "test")
    assert list(discover(bird_root).images) == ["train", "val"]


def test_pre_split_class_mismatch_error_lists_the_differences(bird_root, make_image):
    shutil.rmtree(bird_root / "valid" / "CROW")
    make_image(bird_root / "test" / "ZEBRA FINCH" / "1.jpg")
    with pytest.raises(FinetuneError) as info:
        discover(bird_root)
    message = str(info.value)
    assert "valid/ lacks 'CROW', 'ZEBRA FINCH'" in message
    assert "train/ lacks 'ZEBRA FINCH'" in message
    assert "\n" not in message


def test_train_folder_without_validation_folder_is_an_error(bird_root):
    shutil.rmtree(bird_root / "valid")
    with pytest.raises(FinetuneError, match="exactly one validation folder .*found none"):
        discover(bird_root)


def test_two_validation_folders_are_an_error(bird_root):
    shutil.copytree(bird_root / "valid", bird_root / "val")
    with pytest.raises(FinetuneError, match="found both val/ and valid/"):
        discover(bird_root)


def test_caltech_layout_is_one_folder_of_class_folders(caltech_root):
    found = discover(caltech_root)
    assert found.layout == "folder" and found.split_dirs == {}
    assert found.classes == ["BACKGROUND_Google", "Faces", "accordion", "tiny"]
    assert len(found.images["all"]["tiny"]) == 2


def test_odd_files_hidden_and_non_images_are_ignored_nested_and_linked_are_kept(odd_root):
    images = discover(odd_root).images["all"]
    assert sorted(images) == ["bad", "good", "kinds", "linked"]  # .hidden_class ignored
    assert images["good"] == ["good/0.jpg", "good/1.jpg", "good/2.jpg", "good/link.jpg"]
    assert "kinds/nested/deeper/inner.png" in images["kinds"]
    assert {"kinds/UPPER.JPG", "kinds/Mixed.JpEg", "kinds/scan.tiff", "kinds/web.webp"} <= set(images["kinds"])
    assert images["linked"] == ["linked/0.jpg", "linked/1.jpg"]


def test_class_folder_linking_back_to_the_root_is_ignored_with_a_warning(odd_root, caplog):
    assert "loop_class" not in discover(odd_root).classes
    assert f"ignoring class folder {odd_root / 'loop_class'}: a link back to" in caplog.text


def test_symlink_cycles_are_not_followed(odd_root):
    # kinds/loop -> kinds and kinds/nested/up -> the root: neither may add images (nor loop forever).
    images = find_images(odd_root / "kinds", odd_root)
    assert not [p for p in images if "/loop/" in p or "/up/" in p]
    assert len(images) == 13


def test_second_link_to_a_walked_folder_is_not_walked_twice(tmp_path, make_image):
    make_image(tmp_path / "root" / "a" / "sub" / "1.png")
    (tmp_path / "root" / "a" / "again").symlink_to(tmp_path / "root" / "a" / "sub", target_is_directory=True)
    assert find_images(tmp_path / "root" / "a", tmp_path / "root") == ["a/again/1.png"]


def test_loose_images_in_root_are_ignored_with_a_warning(caltech_root, make_image, caplog):
    make_image(caltech_root / "stray.jpg")
    assert "stray.jpg" not in str(discover(caltech_root).images)
    assert "ignoring 1 image(s) directly in" in caplog.text


def test_root_without_class_folders_is_an_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FinetuneError, match="no class folders with images"):
        discover(tmp_path / "empty")


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(FinetuneError, match="is not a folder"):
        discover(tmp_path / "nope")
