from pathlib import Path

import pytest

import finetune
from finetune.data import list_cards, load_card
from finetune.errors import FinetuneError

DATASETS = Path(finetune.__file__).resolve().parents[1] / "datasets"


def test_the_three_cards_ship_and_datasets_is_not_a_package():
    assert list_cards() == ["bird225", "caltech101", "digits"]
    assert not (DATASETS / "__init__.py").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in DATASETS.glob("*.yaml")))
def test_every_shipped_card_validates_and_is_named_after_its_file(name):
    card = load_card(name)
    assert card["name"] == name
    assert card["source"]["url"].startswith("https://")


def test_bird225_card_is_pre_split_with_the_seed_reference_accuracies():
    card = load_card("bird225")
    assert card["layout"] == "pre-split" and card["num_classes"] == 225 and card["image_size"] == (224, 224)
    assert {(r["model"], r["head"], r["accuracy"]) for r in card["references"]} == {
        ("wide_resnet101_2", "spinal", 99.56),
        ("vgg19_bn", "spinal", 99.02),
    }


def test_caltech101_card_states_the_30_per_class_protocol():
    card = load_card("caltech101")
    assert card["layout"] == "folder" and card["folder"] == "101_ObjectCategories"
    assert card["split"] == {"val": 0.2, "test": None, "train_per_class": 30, "exclude": ["BACKGROUND_Google"]}
    assert card["num_classes"] == 101 and card["image_size"] is None
    assert {(r["head"], r["accuracy"]) for r in card["references"]} == {("spinal", 96.40), ("linear", 96.11)}


def test_digits_card_splits_by_fractions():
    card = load_card("digits")
    assert card["split"]["val"] == 0.15 and card["split"]["test"] == 0.15 and card["split"]["train_per_class"] is None
    assert card["num_classes"] == 10


def test_unknown_card_lists_the_known_ones():
    with pytest.raises(FinetuneError, match="unknown dataset card 'cifar10'; known cards: bird225, caltech101, digits"):
        load_card("cifar10")


def test_card_from_a_path_is_validated_naming_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\ntitle: Mine\nlayout: folder\nnum_classes: 3\nsource: {url: https://example.org}\n"
        "split: {train_per_class: 0}\n"
    )
    with pytest.raises(FinetuneError, match=r"mine.yaml: split.train_per_class: Input should be greater than or equal to 1"):
        load_card(path)
    path.write_text(path.read_text().replace("train_per_class: 0", "trian_per_class: 3"))
    with pytest.raises(FinetuneError, match="split.trian_per_class: Extra inputs are not permitted"):
        load_card(path)
    path.write_text(path.read_text().replace("trian_per_class", "train_per_class"))
    assert load_card(str(path))["split"]["train_per_class"] == 3
