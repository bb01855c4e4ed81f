import numpy as np
import pytest

from sentiment_ray.training.calibration import (
    best_thresholds,
    brier_score,
    calibration_report,
    expected_calibration_error,
)


def test_ece_is_zero_for_calibrated_scores_and_the_gap_for_overconfident_ones():
    # Among rows scored 0.25 one in four is positive, among rows scored 0.75 three in four: calibrated.
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    scores = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(y, scores) == pytest.approx(0.0)
    # Every row scored 0.9 but only half are positive: off by 0.4 everywhere.
    assert expected_calibration_error([1, 0, 1, 0], [0.9] * 4) == pytest.approx(0.4)
    # Two bins, weighted by rows: 3 rows at 0.95 all positive (gap 0.05), 1 row at 0.05 positive (gap 0.95).
    assert (expected_calibration_error([1, 1, 1, 1], [0.95, 0.95, 0.95, 0.05])
            == pytest.approx(0.75 * 0.05 + 0.25 * 0.95))


def test_brier_score():
    assert brier_score([1, 0], [1.0, 0.0]) == 0.0
    assert brier_score([1, 0, 1, 0], [0.5] * 4) == pytest.approx(0.25)
    assert brier_score([1, 0], [0.8, 0.4]) == pytest.approx((0.04 + 0.16) / 2)


def test_best_thresholds_match_a_brute_force_search():
    y = [0, 0, 1, 1]
    best = best_thresholds(y, [0.1, 0.4, 0.35, 0.8])
    # 0.35 and 0.8 both give 3 of 4 right; the one nearer 0.5 is reported.
    assert (best["accuracy"].threshold, best["accuracy"].value) == (0.35, 0.75)
    assert (best["f1"].threshold, best["f1"].value) == (0.35, pytest.approx(0.8))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    scores = np.clip(0.3 * y + rng.random(400) * 0.7, 0, 1).round(3)  # ties included
    best = best_thresholds(y, scores)
    candidates = np.r_[np.unique(scores), 1.01]
    accuracy = [np.mean((scores >= t) == y) for t in candidates]
    assert best["accuracy"].value == pytest.approx(max(accuracy))
    assert np.mean((scores >= best["accuracy"].threshold) == y) == pytest.approx(max(accuracy))
    f1 = [2 * np.sum((scores >= t) & (y == 1)) / (np.sum(scores >= t) + y.sum()) for t in candidates]
    assert best["f1"].value == pytest.approx(max(f1))


def test_the_report_holds_the_reliability_bins_it_was_computed_from():
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    report = calibration_report(y, [0.25] * 4 + [0.75] * 4)
    assert report["ece_bins"] == 15 and len(report["reliability"]) == 15
    filled = [b for b in report["reliability"] if b["rows"]]
    assert [(b["rows"], b["mean_score"], b["fraction_positive"]) for b in filled] == [(4, 0.25, 0.25), (4, 0.75, 0.75)]
    assert sum(b["rows"] for b in report["reliability"]) == 8
