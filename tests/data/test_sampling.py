from collections import Counter

import numpy as np
import pytest
import torch

from finetune.data import BalancedSampler, class_counts, class_weights
from finetune.errors import FinetuneError

LABELS = [0] * 80 + [1] * 15 + [2] * 5


def test_class_counts_include_empty_classes():
    assert class_counts([0, 2, 2, 2], 4).tolist() == [1, 0, 3, 0]


def test_class_counts_reject_labels_out_of_range():
    with pytest.raises(FinetuneError, match=r"labels must lie in \[0, 2\)"):
        class_counts([0, 2], 2)


def test_inverse_weights_are_proportional_to_one_over_count_with_mean_one():
    weights = class_weights([80, 15, 5], mode="inverse")
    assert weights.dtype == torch.float32
    assert weights.mean().item() == pytest.approx(1.0)
    raw = np.array([1 / 80, 1 / 15, 1 / 5])
    assert np.allclose(weights.numpy(), raw * 3 / raw.sum())


def test_effective_weights_follow_the_effective_number_formula():
    beta = 0.9
    weights = class_weights([80, 15, 5], mode="effective", beta=beta)
    raw = np.array([(1 - beta) / (1 - beta**n) for n in (80, 15, 5)])
    assert np.allclose(weights.numpy(), raw * 3 / raw.sum())
    assert weights[0] < weights[1] < weights[2]


def test_effective_weights_span_equal_to_inverse():
    assert torch.allclose(class_weights([80, 5], mode="effective", beta=0.0), torch.ones(2))
    assert torch.allclose(class_weights([80, 5], mode="effective", beta=1 - 1e-9), class_weights([80, 5]), rtol=1e-3)


def test_empty_class_gets_zero_weight_and_the_others_mean_one():
    weights = class_weights([10, 0, 30])
    assert weights[1] == 0 and weights[[0, 2]].mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(counts=[1, 2], mode="sqrt"), "unknown class weight mode 'sqrt'"),
        (dict(counts=[1, 2], mode="effective", beta=1.0), r"beta must lie in \[0, 1\)"),
        (dict(counts=[0, 0]), "at least one sample"),
        (dict(counts=[3, -1]), "non-negative"),
    ],
)
def test_bad_class_weight_arguments_are_rejected(kwargs, message):
    with pytest.raises(FinetuneError, match=message):
        class_weights(**kwargs)


def test_balanced_sampler_draws_every_class_equally_often():
    sampler = BalancedSampler(LABELS, num_samples=300, seed=0)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 300
    assert Counter(LABELS[i] for i in drawn) == {0: 100, 1: 100, 2: 100}
    minority = Counter(i for i in drawn if LABELS[i] == 2)
    assert set(minority.values()) == {20}  # each of the 5 images drawn 100 / 5 times


def test_balanced_sampler_shares_a_remainder_among_classes():
    counts = Counter(LABELS[i] for i in BalancedSampler(LABELS, seed=0))  # 100 draws over 3 classes
    assert sorted(counts.values()) == [33, 33, 34]


def test_balanced_sampler_is_deterministic_per_seed_and_epoch():
    sampler = BalancedSampler(LABELS, seed=4)
    first = list(sampler)
    assert list(BalancedSampler(LABELS, seed=4)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(BalancedSampler(LABELS, seed=5)) != first


def test_balanced_sampler_ranks_partition_the_epoch():
    ranks = [BalancedSampler(LABELS, num_samples=99, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in ranks] == [50, 50]
    together = list(ranks[0]) + list(ranks[1])
    single = BalancedSampler(LABELS, num_samples=100, seed=1)
    assert Counter(together) == Counter(single)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=[]), "at least one sample"),
        (dict(labels=[0, 1], rank=2, num_replicas=2), r"rank must lie in \[0, 2\)"),
        (dict(labels=[0, 1], num_samples=0), "num_samples must be positive"),
    ],
)
def test_bad_sampler_arguments_are_rejected(kwargs, message):
    with pytest.raises(FinetuneError, match=message):
        BalancedSampler(**kwargs)
