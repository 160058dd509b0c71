import math
import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support, top_k_accuracy_score

from finetune.errors import FinetuneError
from finetune.evaluation import (
    classification_metrics,
    expected_calibration_error,
    most_confused_pairs,
    per_class_rows,
    topk_accuracy,
)
from finetune.inference.predictor import topk_indices

CLASSES = ["A", "B", "C", "D"]
# Six samples, four classes; D never occurs but is predicted once. Confusion (rows true, columns predicted):
#   A: 2 1 0 0    B: 0 1 0 1    C: 0 0 1 0    D: 0 0 0 0
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PROB = np.array([
    [0.70, 0.20, 0.10, 0.00],  # A -> A, confidence .7
    [0.60, 0.10, 0.10, 0.20],  # A -> A, .6
    [0.30, 0.50, 0.15, 0.05],  # A -> B, .5
    [0.10, 0.80, 0.10, 0.00],  # B -> B, .8
    [0.10, 0.20, 0.30, 0.40],  # B -> D, .4
    [0.10, 0.10, 0.80, 0.00],  # C -> C, .8
])


def test_metrics_match_hand_computed_values_on_a_known_confusion():
    m = classification_metrics(Y_TRUE, Y_PROB, class_names=CLASSES)

    np.testing.assert_array_equal(m["confusion"], [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert m["num_samples"] == 6 and m["num_classes"] == 4
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision A 1, B 1/2, C 1, D 0; recall A 2/3, B 1/2, C 1, D 0 (absent); F1 A .8, B .5, C 1, D 0
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1 + 0) / 4)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 1 + 0) / 4)
    assert m["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 1 * 1) / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)  # over classes that occur
    assert m["per_class_recall"] == pytest.approx({"A": 2 / 3, "B": 0.5, "C": 1.0, "D": 0.0})
    assert m["top5_accuracy"] == 1.0  # 4 classes: top-4 always hits
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.3, 0.8, 0.2, 0.8])))
    # every confidence in its own 1/15-wide bin except the two .8s: gaps .3 .4 .5 .4 and 2 x .2
    assert m["ece"] == pytest.approx((0.3 + 0.4 + 0.5 + 0.4 + 2 * 0.2) / 6)


def test_metrics_average_over_the_given_labels_only():
    m = classification_metrics(Y_TRUE, Y_PROB, class_names=CLASSES, labels=[0, 1, 2])

    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 1) / 3)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["per_class_recall"]["D"] == 0.0


def test_given_loss_replaces_the_negative_log_likelihood():
    assert classification_metrics(Y_TRUE, Y_PROB, class_names=CLASSES, loss=1.25)["loss"] == 1.25


def test_topk_accuracy_counts_the_true_class_among_the_k_most_probable():
    assert topk_accuracy(Y_TRUE, Y_PROB, k=1) == pytest.approx(4 / 6)
    assert topk_accuracy(Y_TRUE, Y_PROB, k=2) == pytest.approx(5 / 6)  # only B -> (D, C) misses


def test_metrics_agree_with_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 12))
    y_prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y_true = rng.integers(0, 11, size=300)  # class 11 never occurs
    y_pred = y_prob.argmax(1)
    names = [f"c{i}" for i in range(12)]
    labels = list(range(12))

    m = classification_metrics(y_true, y_prob, class_names=names)

    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0))
    with pytest.warns(UserWarning):  # scikit-learn warns about the predicted-but-absent class 11
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y_true, y_prob, k=5, labels=labels))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    rows = per_class_rows(m["confusion"], names)
    np.testing.assert_allclose([row["precision"] for row in rows], p)
    np.testing.assert_allclose([row["recall"] for row in rows], r)
    np.testing.assert_allclose([row["f1"] for row in rows], f)
    assert [row["support"] for row in rows] == list(s)


def test_top5_with_two_classes_is_top2():
    m = classification_metrics([0, 1, 1], np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), class_names=["x", "y"])

    assert m["top5_accuracy"] == 1.0
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_ece_is_the_weighted_gap_between_accuracy_and_confidence_per_bin():
    y_true = np.array([0, 1, 0])
    y_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])  # the third prediction is wrong
    # bins of width .5: (.5, 1] holds all three; accuracy 2/3, mean confidence 2.3/3
    assert expected_calibration_error(y_true, y_prob, bins=2) == pytest.approx(abs(2 / 3 - 2.3 / 3))
    # with 10 bins each sample is alone: gaps .1, .2, .6
    assert expected_calibration_error(y_true, y_prob, bins=10) == pytest.approx((0.1 + 0.2 + 0.6) / 3)


def test_per_class_rows_name_the_most_frequent_wrong_prediction():
    rows = per_class_rows(np.array([[5, 1, 3], [0, 4, 0], [2, 0, 0]]), ["cat", "dog", "fox"])

    assert [(r["class"], r["top_confusion"], r["top_confusion_count"]) for r in rows] == [
        ("cat", "fox", 3), ("dog", "", 0), ("fox", "cat", 2)
    ]
    assert rows[2]["precision"] == 0.0 and rows[2]["recall"] == 0.0 and rows[2]["f1"] == 0.0
    assert rows[0]["precision"] == pytest.approx(5 / 7) and rows[0]["recall"] == pytest.approx(5 / 9)


def test_most_confused_pairs_are_sorted_by_count_then_class_index():
    confusion = np.array([[5, 1, 3], [2, 4, 0], [2, 0, 9]])

    assert most_confused_pairs(confusion, ["a", "b", "c"]) == [
        ("a", "c", 3), ("b", "a", 2), ("c", "a", 2), ("a", "b", 1)
    ]
    assert most_confused_pairs(confusion, ["a", "b", "c"], limit=1) == [("a", "c", 3)]


@pytest.mark.parametrize(
    ("y_true", "y_prob", "message"),
    [
        ([], np.zeros((0, 2)), "no samples"),
        ([0, 1], np.full((2, 3), 1 / 3), "shape"),
        ([0, 2], np.full((2, 2), 0.5), "labels must lie"),
    ],
)
def test_metrics_reject_empty_or_mismatched_inputs(y_true, y_prob, message):
    with pytest.raises(FinetuneError, match=message):
        classification_metrics(y_true, y_prob, class_names=["x", "y"])


def test_confident_miss_gives_a_finite_loss():
    m = classification_metrics([0], np.array([[0.0, 1.0]]), class_names=["x", "y"])

    assert math.isfinite(m["loss"]) and m["loss"] == pytest.approx(-math.log(1e-12))


def test_topk_indices_equals_a_stable_descending_argsort_including_ties():
    rng = np.random.default_rng(0)
    probs = rng.random((200, 50)).astype(np.float32)
    probs[:20] = np.round(probs[:20], 1)  # many ties, some across the k-th place
    probs[20] = 0.02  # a row of one value: the lowest k indices
    for k in (1, 5, 49, 50, 80):
        expected = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, 50)]
        np.testing.assert_array_equal(topk_indices(probs, k), expected)
        np.testing.assert_array_equal(topk_indices(probs, k, block=120), expected)  # several row blocks


def test_metrics_on_many_classes_make_no_float64_copy_or_full_sort():
    rng = np.random.default_rng(1)
    y_prob = rng.random((2000, 3000), dtype=np.float32)
    y_prob /= y_prob.sum(axis=1, keepdims=True)
    y_true = rng.integers(0, 3000, 2000)
    tracemalloc.start()
    top5 = topk_accuracy(y_true, y_prob, k=5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert top5 == pytest.approx(top_k_accuracy_score(y_true, y_prob, k=5, labels=np.arange(3000)))
    # a stable argsort of -y_prob needs 3x the matrix (the negated copy, int64 indices), a float64 copy 2x
    assert peak < 0.5 * y_prob.nbytes
