"""Multi-label metrics and thresholds (issue 25, evaluation part): equal to scikit-learn's, thresholds with a known
answer."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, hamming_loss, label_ranking_average_precision_score

from finetune.errors import FinetuneError
from finetune.evaluation.multilabel import confused_label_pairs, multilabel_metrics, tune_thresholds


def _predictions(n=200, c=5, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.linspace(0.1, 0.5, c)).astype(int)
    prob = np.clip(0.6 * y + rng.normal(0.2, 0.2, (n, c)), 0, 1)
    return y, prob


def test_map_and_set_metrics_equal_scikit_learns_on_the_same_predictions():
    y, prob = _predictions()
    names = [f"l{i}" for i in range(5)]
    m = multilabel_metrics(y, prob, class_names=names, thresholds=0.4)
    assert m["map_macro"] == pytest.approx(average_precision_score(y, prob, average="macro"))
    assert m["map_micro"] == pytest.approx(average_precision_score(y, prob, average="micro"))
    pred = prob >= 0.4
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["subset_accuracy"] == pytest.approx((pred == y).all(1).mean())
    assert m["lrap"] == pytest.approx(label_ranking_average_precision_score(y[y.sum(1) > 0], prob[y.sum(1) > 0]))
    row = m["per_class"][2]
    assert row["ap"] == pytest.approx(average_precision_score(y[:, 2], prob[:, 2]))
    assert row["tp"] + row["fn"] == row["support"] == y[:, 2].sum()
    assert row["tp"] + row["fp"] == pred[:, 2].sum() and row["threshold"] == 0.4


def test_a_label_without_positives_is_left_out_of_the_macro_map_and_counted():
    y, prob = _predictions()
    y[:, 0] = 0
    m = multilabel_metrics(y, prob, class_names=list("abcde"))
    assert m["ap_labels"] == 4 and m["per_class"][0]["ap"] is None
    assert m["map_macro"] == pytest.approx(np.mean([average_precision_score(y[:, c], prob[:, c]) for c in range(1, 5)]))


def test_thresholds_maximise_f1_on_a_case_with_a_known_answer():
    """Label 0: positives score 0.7 and 0.8, negatives 0.1, 0.2, 0.6 and 0.75: best F1 (0.8) for a threshold in
    (0.6, 0.7], so 0.65 (the middle), not 0.5 (F1 0.67). Label 1: positives at 0.2 and 0.25, negatives at 0.12 and
    below: F1 1.0 in (0.12, 0.2], so 0.16."""
    prob = np.array([[0.7, 0.2], [0.8, 0.25], [0.1, 0.1], [0.2, 0.05], [0.6, 0.12], [0.75, 0.0]])
    y = np.array([[1, 1], [1, 1], [0, 0], [0, 0], [0, 0], [0, 0]])
    tuned = tune_thresholds(y, prob)
    assert tuned["per_class"] == pytest.approx([0.65, 0.16])
    assert tuned["f1"] == pytest.approx([0.8, 1.0])
    at_tuned = multilabel_metrics(y, prob, class_names=["a", "b"], thresholds=tuned["per_class"])
    at_half = multilabel_metrics(y, prob, class_names=["a", "b"])
    assert at_tuned["f1_macro"] > at_half["f1_macro"]
    # no threshold does better for any label than the tuned one
    for c in range(2):
        for t in np.unique(prob[:, c]):
            assert f1_score(y[:, c], prob[:, c] >= t, zero_division=0) <= tuned["f1"][c] + 1e-12


def test_confused_pairs_count_false_positives_of_a_label_beside_another():
    names = ["bird", "feeder", "cat"]
    y = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
    prob = np.array([[0.9, 0.9, 0.1], [0.8, 0.9, 0.1], [0.7, 0.9, 0.1], [0.1, 0.1, 0.9]])
    (top, *_rest) = confused_label_pairs(y, prob, class_names=names)
    assert top == {"predicted": "bird", "present": "feeder", "count": 2, "of_false_positives": 1.0}


def test_shapes_and_targets_are_checked():
    with pytest.raises(FinetuneError, match="N x C"):
        multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 3)), class_names=["a", "b"])
    with pytest.raises(FinetuneError, match="0 or 1"):
        tune_thresholds(np.full((2, 2), 2), np.zeros((2, 2)))
