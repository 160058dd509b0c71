import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from finetune.data import Manifest, load_card, prepare_manifest
from finetune.errors import FinetuneError


@pytest.fixture(scope="module")
def caltech_full(tmp_path_factory):
    """Caltech-101 at its real shape, in 8×8 PNGs: 101 categories of 31-40 images plus BACKGROUND_Google."""
    root = tmp_path_factory.mktemp("full") / "caltech-101" / "101_ObjectCategories"
    rng = np.random.default_rng(0)
    for c, label in enumerate(["BACKGROUND_Google"] + [f"category_{i:03d}" for i in range(101)]):
        (root / label).mkdir(parents=True)
        for i in range(31 + c % 10):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / label / f"image_{i:04d}.png")
    return root


def test_caltech_card_splits_30_per_class_rest_test_without_background(caltech_full):
    manifest, bad = prepare_manifest(caltech_full, card="caltech101", seed=0)
    assert bad == []
    assert manifest.root == caltech_full
    assert len(manifest.classes) == 101 and "BACKGROUND_Google" not in manifest.classes
    counts = manifest.counts()
    assert set(counts["train"].values()) == {30}
    for label in manifest.classes:
        rest = sum(counts[s][label] for s in ("val", "test"))
        assert rest == len(list((caltech_full / label).iterdir())) - 30
        assert counts["val"][label] == (0 if rest == 1 else max(1, int(0.2 * rest + 0.5)))
        assert counts["test"][label] >= 1


def test_caltech_split_is_byte_identical_for_the_same_seed(caltech_full, tmp_path):
    first = prepare_manifest(caltech_full, card="caltech101", seed=5, scan=False)[0].write_csv(tmp_path / "a.csv")
    second = prepare_manifest(caltech_full, card="caltech101", seed=5, scan=False)[0].write_csv(tmp_path / "b.csv")
    other = prepare_manifest(caltech_full, card="caltech101", seed=6, scan=False)[0].write_csv(tmp_path / "c.csv")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_explicit_split_arguments_override_the_card_and_exclude_adds_to_it(caltech_root):
    card = {**load_card("caltech101"), "num_classes": 3}
    manifest, _ = prepare_manifest(caltech_root, card=card, train_per_class=3, val=0.0, scan=False)
    assert manifest.classes == ["Faces", "accordion", "tiny"]  # BACKGROUND_Google excluded by the card
    assert manifest.counts()["train"] == {"Faces": 3, "accordion": 3, "tiny": 1}
    assert manifest.splits() == ["train", "test"]
    fewer, _ = prepare_manifest(caltech_root, card={**card, "num_classes": 2}, exclude=["tiny"], scan=False)
    assert fewer.classes == ["Faces", "accordion"]


def test_root_holding_the_card_folder_is_an_error_naming_it(caltech_root):
    with pytest.raises(FinetuneError, match=f"card 'caltech101': the class folders are in {caltech_root}; give that as the root"):
        prepare_manifest(caltech_root.parent, card="caltech101")


def test_caltech_like_folder_with_two_image_class_is_split_and_the_shortfall_logged(caltech_root, caplog):
    with caplog.at_level(logging.WARNING):
        manifest, _ = prepare_manifest(caltech_root, train_per_class=3, val=0.2, exclude=["BACKGROUND_Google"])
    counts = manifest.counts()
    assert counts["train"] == {"Faces": 3, "accordion": 3, "tiny": 1}
    assert counts["val"] == {"Faces": 2, "accordion": 1, "tiny": 0}
    assert counts["test"] == {"Faces": 7, "accordion": 5, "tiny": 1}
    assert "train: 1 class(es) too small to get 3 images: 'tiny' (n=2)" in caplog.text
    assert "val: 1 class(es) too small to get any image: 'tiny' (n=2)" in caplog.text


def test_fraction_defaults_without_card(caltech_root):
    manifest, _ = prepare_manifest(caltech_root, scan=False)
    assert manifest.counts()["test"]["Faces"] == 2  # round(0.15 × 12)
    assert manifest.counts()["val"]["Faces"] == 2


def test_pre_split_root_is_used_as_split_with_split_names_normalised(bird_root):
    manifest, bad = prepare_manifest(bird_root)
    assert bad == []
    assert manifest.splits() == ["train", "val", "test"]
    assert manifest.items("val")[0] == (bird_root / "valid/AFRICAN CROWNED CRANE/1.jpg", 0)
    with_card, _ = prepare_manifest(bird_root, card={**load_card("bird225"), "num_classes": 3})
    assert with_card.rows == manifest.rows


def test_bad_files_are_excluded_and_reported_with_reasons(odd_root, tmp_path, caplog):
    report = tmp_path / "reports" / "bad.csv"
    with caplog.at_level(logging.WARNING):
        manifest, bad = prepare_manifest(odd_root, report_path=report)
    assert sorted(b.path for b in bad) == [
        "bad/bomb.png",
        "bad/empty.jpg",
        "bad/text.jpg",
        "bad/truncated.jpg",
        "bad/truncated.png",
    ]
    assert not {b.path for b in bad} & {r.path for r in manifest.rows}
    assert manifest.classes == ["good", "kinds", "linked"]
    assert "dropping class(es) with no usable image: 'bad'" in caplog.text
    lines = report.read_text().splitlines()
    assert lines[0] == "path,reason"
    assert "bad/empty.jpg,empty file (0 bytes)" in lines
    assert len(lines) == 6


def test_report_is_rewritten_empty_when_nothing_is_bad(bird_root, tmp_path):
    report = tmp_path / "bad.csv"
    report.write_text("path,reason\nstale.jpg,old\n")
    prepare_manifest(bird_root, report_path=report)
    assert report.read_text() == "path,reason\n"


def test_pixel_limit_is_configurable(bird_root, make_image):
    make_image(bird_root / "train/CROW/big.jpg", size=(40, 40))
    _, bad = prepare_manifest(bird_root, max_pixels=24 * 24)
    assert [(b.path, b.reason) for b in bad] == [
        ("train/CROW/big.jpg", "too many pixels (decompression bomb?): 40×40 = 1,600 > limit 576")
    ]


def test_without_scan_bad_files_stay_in_the_manifest(odd_root):
    manifest, bad = prepare_manifest(odd_root, scan=False)
    assert bad == [] and "bad/empty.jpg" in {r.path for r in manifest.rows}


@pytest.mark.parametrize(
    "options, hit, expected",
    [  # Faces has 12 images, 2 of them bad: 10 usable
        (dict(train_per_class=5, val=0.0), "train", {"train": 5, "test": 5}),
        (dict(val=0.25, test=0.25), "test", {"train": 4, "val": 3, "test": 3}),
    ],
)
def test_bad_files_are_dropped_before_the_split_as_if_absent(caltech_root, tmp_path, options, hit, expected):
    clean, _ = prepare_manifest(caltech_root, seed=1, **options)
    damaged_paths = [r.path for r in clean.rows if r.label == "Faces" and r.split == hit][:2]
    for rel in damaged_paths:
        (caltech_root / rel).write_bytes(b"")

    damaged, bad = prepare_manifest(caltech_root, seed=1, **options)

    assert sorted(b.path for b in bad) == sorted(damaged_paths)
    assert {s: c["Faces"] for s, c in damaged.counts().items() if c["Faces"]} == expected
    for rel in damaged_paths:
        (caltech_root / rel).unlink()
    absent, _ = prepare_manifest(caltech_root, seed=1, **options)
    assert damaged.rows == absent.rows


def test_manifest_is_reused_instead_of_splitting(caltech_root, tmp_path):
    manifest, _ = prepare_manifest(caltech_root, seed=3)
    path = manifest.write_csv(tmp_path / "split.csv")
    inside = manifest.write_csv(caltech_root / "split.csv")
    from_manifest, _ = prepare_manifest(manifest=path, root=caltech_root)
    as_root, _ = prepare_manifest(inside, scan=False)  # a CSV given as the root; its root is its folder
    alone, _ = prepare_manifest(manifest=inside, scan=False)
    assert from_manifest.rows == manifest.rows and from_manifest.root == caltech_root
    assert as_root.rows == alone.rows == manifest.rows and as_root.root == alone.root == caltech_root


def test_manifest_away_from_its_root_without_the_root_is_an_error_naming_the_fix(caltech_root, tmp_path):
    path = prepare_manifest(caltech_root, scan=False)[0].write_csv(tmp_path / "split.csv")
    with pytest.raises(FinetuneError, match=f"none of the 29 images listed in {path} exists under {tmp_path}: .*data.root"):
        prepare_manifest(path, scan=False)
    with pytest.raises(FinetuneError, match="data root .* is a file: with a manifest, give the dataset folder"):
        prepare_manifest(path, manifest=path)


def test_moved_dataset_with_its_manifest_gives_the_same_items(caltech_root, tmp_path):
    manifest, _ = prepare_manifest(caltech_root, seed=3)
    manifest.write_csv(caltech_root / "split.csv")
    moved = shutil.copytree(caltech_root, tmp_path / "other-machine" / "data")
    again, bad = prepare_manifest(moved / "split.csv")
    assert bad == []
    assert [(p.relative_to(moved), y) for p, y in again.items("train")] == [
        (p.relative_to(caltech_root), y) for p, y in manifest.items("train")
    ]


def test_missing_manifest_file_is_reported_by_the_scan(caltech_root, tmp_path):
    manifest, _ = prepare_manifest(caltech_root)
    path = manifest.write_csv(caltech_root / "split.csv")
    (caltech_root / "Faces" / "image_0002.jpg").unlink()
    _, bad = prepare_manifest(path)
    assert [(b.path, b.reason) for b in bad] == [("Faces/image_0002.jpg", "cannot read file: No such file or directory")]


def test_leakage_between_splits_is_warned(bird_root, caplog):
    shutil.copy(bird_root / "train/CROW/1.jpg", bird_root / "test/CROW/copy.jpg")
    with caplog.at_level(logging.WARNING):
        prepare_manifest(bird_root)
    assert "1 group(s) of byte-identical images sit in more than one split (leakage)" in caplog.text
    assert "test/CROW/copy.jpg = train/CROW/1.jpg" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(val=0.1), "val cannot be used: .* is already split"),
        (dict(train_per_class=5), "train_per_class cannot be used"),
    ],
)
def test_split_options_on_a_pre_split_root_are_errors(bird_root, kwargs, message):
    with pytest.raises(FinetuneError, match=message):
        prepare_manifest(bird_root, **kwargs)


def test_split_options_with_a_manifest_are_errors(caltech_root, tmp_path):
    path = prepare_manifest(caltech_root, scan=False)[0].write_csv(tmp_path / "m.csv")
    with pytest.raises(FinetuneError, match="test cannot be used with a manifest"):
        prepare_manifest(manifest=path, root=caltech_root, test=0.2)


def test_test_fraction_with_train_per_class_is_an_error(caltech_root):
    with pytest.raises(FinetuneError, match="test cannot be combined with train_per_class=3"):
        prepare_manifest(caltech_root, train_per_class=3, test=0.2)


def test_card_layout_mismatch_is_an_error(caltech_root):
    with pytest.raises(FinetuneError, match="card 'bird225' expects a pre-split dataset, but .* is folder"):
        prepare_manifest(caltech_root, card="bird225")


def test_card_class_count_mismatch_is_an_error(caltech_root):
    with pytest.raises(FinetuneError, match="card 'caltech101' expects 101 classes, found 3"):
        prepare_manifest(caltech_root, card="caltech101")


def test_no_source_is_an_error():
    with pytest.raises(FinetuneError, match="give a dataset root or a manifest"):
        prepare_manifest()


def test_all_images_bad_is_an_error(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(FinetuneError, match="no usable image"):
        prepare_manifest(tmp_path / "d")


def test_manifest_round_trips_through_prepare(bird_root, tmp_path):
    manifest, _ = prepare_manifest(bird_root)
    again = Manifest.read_csv(manifest.write_csv(tmp_path / "m.csv"), root=bird_root)
    assert again.rows == manifest.rows and again.classes == manifest.classes
