import logging

import pytest

from finetune.data import split_classes
from finetune.errors import FinetuneError


def paths(label, n, start=0):
    return [f"{label}/img_{i:04d}.jpg" for i in range(start, start + n)]


def sizes(splits):
    return {s: {c: len(p) for c, p in per.items()} for s, per in splits.items()}


def where(splits):
    return {p: s for s, per in splits.items() for ps in per.values() for p in ps}


def test_fractions_split_every_class_in_proportion():
    images = {"a": paths("a", 100), "b": paths("b", 40), "c": paths("c", 20)}
    splits = split_classes(images, val=0.15, test=0.15, train_per_class=None, seed=0)
    assert sizes(splits) == {
        "test": {"a": 15, "b": 6, "c": 3},
        "val": {"a": 15, "b": 6, "c": 3},
        "train": {"a": 70, "b": 28, "c": 14},
    }


def test_every_image_lands_in_exactly_one_split():
    images = {"a": paths("a", 37), "b": paths("b", 11)}
    assignment = where(split_classes(images, val=0.2, test=0.1, train_per_class=None, seed=3))
    assert sorted(assignment) == sorted(images["a"] + images["b"])


def test_small_classes_keep_one_image_per_split_when_they_can_and_say_where_not(caplog):
    images = {"three": paths("three", 3), "two": paths("two", 2), "one": paths("one", 1)}
    with caplog.at_level(logging.WARNING):
        splits = split_classes(images, val=0.1, test=0.1, train_per_class=None, seed=0)
    assert {s: len(per["three"]) for s, per in splits.items()} == {"test": 1, "val": 1, "train": 1}
    assert sizes(splits)["train"]["two"] == 1 and sizes(splits)["test"]["two"] == 1 and "two" not in splits["val"]
    assert sizes(splits)["train"]["one"] == 1
    assert "val: 2 class(es) too small to get any image: 'two' (n=2), 'one' (n=1)" in caplog.text
    assert "test: 1 class(es) too small to get any image: 'one' (n=1)" in caplog.text


def test_same_seed_gives_the_same_split_and_another_seed_another():
    images = {"a": paths("a", 50), "b": paths("b", 30)}
    first = split_classes(images, val=0.15, test=0.15, train_per_class=None, seed=7)
    assert split_classes(images, val=0.15, test=0.15, train_per_class=None, seed=7) == first
    assert split_classes(images, val=0.15, test=0.15, train_per_class=None, seed=8) != first


def test_split_does_not_depend_on_the_order_files_are_listed():
    images = {"a": paths("a", 50)}
    reversed_images = {"a": paths("a", 50)[::-1]}
    kwargs = dict(val=0.15, test=0.15, train_per_class=None, seed=1)
    assert split_classes(images, **kwargs) == split_classes(reversed_images, **kwargs)


def test_train_per_class_takes_n_for_training_and_val_from_the_rest(caplog):
    images = {"a": paths("a", 31), "b": paths("b", 50), "c": paths("c", 800)}
    with caplog.at_level(logging.WARNING):
        splits = split_classes(images, val=0.2, test=0.5, train_per_class=30, seed=0)  # test ignored
    assert sizes(splits) == {
        "train": {"a": 30, "b": 30, "c": 30},
        "val": {"b": 4, "c": 154},
        "test": {"a": 1, "b": 16, "c": 616},
    }
    assert "val: 1 class(es) too small to get any image: 'a' (n=31)" in caplog.text


def test_train_per_class_keeps_one_test_image_for_classes_below_n(caplog):
    images = {"small": paths("small", 2), "big": paths("big", 10)}
    with caplog.at_level(logging.WARNING):
        splits = split_classes(images, val=0.0, test=0.0, train_per_class=5, seed=0)
    assert sizes(splits) == {"train": {"small": 1, "big": 5}, "test": {"small": 1, "big": 5}}
    assert "train: 1 class(es) too small to get 5 images: 'small' (n=2)" in caplog.text


def test_added_files_move_few_existing_ones_and_leave_other_classes_untouched():
    kwargs = dict(val=0.15, test=0.15, train_per_class=None, seed=0)
    before = where(split_classes({"a": paths("a", 100), "b": paths("b", 60)}, **kwargs))
    after = where(split_classes({"a": paths("a", 100) + paths("a", 3, start=100), "b": paths("b", 60)}, **kwargs))
    moved = [p for p in before if after[p] != before[p]]
    assert len(moved) <= 2 * 3  # each of the two boundaries moves by at most the 3 images added
    assert not [p for p in moved if p.startswith("b/")]


def test_added_files_change_at_most_that_many_training_images_per_class():
    kwargs = dict(val=0.0, test=0.0, train_per_class=30, seed=0)
    before = split_classes({"a": paths("a", 60)}, **kwargs)["train"]["a"]
    after = split_classes({"a": paths("a", 62)}, **kwargs)["train"]["a"]
    assert len(set(before) - set(after)) <= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(val=0.5, test=0.5), "val \\+ test must be below 1"),
        (dict(val=-0.1, test=0.1), "val must be a fraction"),
        (dict(val=0.1, test=1.0), "test must be a fraction"),
        (dict(val=0.1, test=0.1, train_per_class=0), "train_per_class must be a positive integer"),
    ],
)
def test_invalid_split_options_are_rejected(kwargs, message):
    kwargs = {"train_per_class": None, **kwargs}
    with pytest.raises(FinetuneError, match=message):
        split_classes({"a": paths("a", 10)}, seed=0, **kwargs)
