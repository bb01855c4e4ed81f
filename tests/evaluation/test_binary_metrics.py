"""The numpy metrics against their definitions: hand-counted cases, and ROC AUC against the count over every
(positive, negative) pair, ties counting half."""

import itertools

import numpy as np
import pytest

from sentiment_ray.evaluation.binary_metrics import ConfusionCounts, roc_auc, roc_curve


def test_counts_and_the_rates_from_them():
    counts = ConfusionCounts.of([1, 1, 1, 0, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1, 0, 0])
    assert (counts.tn, counts.fp, counts.fn, counts.tp) == (3, 1, 2, 2)
    assert counts.matrix.tolist() == [[3, 1], [2, 2]]
    assert (counts.accuracy, counts.precision, counts.recall, counts.f1) == (5 / 8, 2 / 3, 1 / 2, 4 / 7)


def test_nothing_predicted_positive_gives_zero_not_a_division_error():
    counts = ConfusionCounts.of([1, 0, 0], [0, 0, 0])
    assert (counts.precision, counts.recall, counts.f1, counts.accuracy) == (0.0, 0.0, 0.0, 2 / 3)
    assert ConfusionCounts.of([0, 0], [0, 0]).f1 == 0.0


def _pairwise_auc(y, s) -> float:
    positives = [v for v, label in zip(s, y) if label == 1]
    negatives = [v for v, label in zip(s, y) if label == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_is_the_share_of_pairs_ordered_right_with_ties_counting_half(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[0, 1, rng.integers(0, 2, 150)]
    scores = np.round(rng.random(y.size), 1)  # one decimal: many ties, within and across the classes
    assert roc_auc(y, scores) == pytest.approx(_pairwise_auc(y, scores), abs=1e-12)


def test_roc_auc_of_perfect_inverted_and_all_tied_scores_and_one_class():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


def test_roc_curve_steps_through_each_distinct_score_from_the_highest():
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert thresholds.tolist() == [np.inf, 0.8, 0.4, 0.35, 0.1]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    # the trapezoids under it are the AUC
    trapezoids = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert trapezoids == pytest.approx(roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]))
    fpr, tpr, thresholds = roc_curve([0, 1, 1], [0.5, 0.5, 0.9])  # a tie across the classes: one step
    assert thresholds.tolist() == [np.inf, 0.9, 0.5] and fpr.tolist() == [0.0, 0.0, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0]
