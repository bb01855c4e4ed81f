"""Temperature scaling (sentiment_ray/training/calibration.py `fit_temperature`)."""

import numpy as np
import pytest

from sentiment_ray.training.calibration import (
    TEMPERATURE_BOUNDS,
    _negative_log_likelihood,
    expected_calibration_error,
    fit_temperature,
)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_the_fit_recovers_the_temperature_that_generated_the_labels(true_temperature):
    rng = np.random.default_rng(7)
    margins = rng.normal(0.0, 4.0, 20000)
    labels = (rng.random(20000) < 1.0 / (1.0 + np.exp(-margins / true_temperature))).astype(int)
    fit = fit_temperature(margins, labels)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.06)
    assert fit.rows == 20000 and fit.nll_after <= fit.nll_before + 1e-12
    if true_temperature != 1.0:  # an overconfident (T > 1) or underconfident (T < 1) score gets calibrated
        assert fit.ece_before > 0.05 and fit.ece_after < 0.02
    calibrated = 1.0 / (1.0 + np.exp(-margins / fit.temperature))
    assert expected_calibration_error(labels, calibrated) == pytest.approx(fit.ece_after)


def test_rows_of_one_class_cannot_be_fitted():
    with pytest.raises(ValueError, match=r"needs held-out rows of both classes, got 3 rows of \[1\]"):
        fit_temperature([1.0, 2.0, 3.0], [1, 1, 1])


def test_the_fitted_temperature_is_the_likelihoods_minimum_over_the_bounds():
    rng = np.random.default_rng(11)
    margins = rng.normal(1.0, 3.0, 500)
    labels = (rng.random(500) < 0.6).astype(int)  # labels tied to the margins by their share only: a high temperature
    fit = fit_temperature(margins, labels)
    nll = fit.nll_after
    assert nll == _negative_log_likelihood(margins, labels, fit.temperature)
    grid = np.geomspace(*TEMPERATURE_BOUNDS, 4001)
    assert nll <= min(_negative_log_likelihood(margins, labels, t) for t in grid)
    for step in (1 - 1e-6, 1 + 1e-6):  # a local minimum, found to well below the grid's spacing
        assert nll <= _negative_log_likelihood(margins, labels, fit.temperature * step)
    assert TEMPERATURE_BOUNDS[0] < fit.temperature < TEMPERATURE_BOUNDS[1]


def test_separable_rows_get_the_lowest_temperature_and_reversed_rows_the_highest():
    margins = [-2.0, -1.0, 1.0, 2.0]
    assert fit_temperature(margins, [0, 0, 1, 1]).temperature == TEMPERATURE_BOUNDS[0]  # sharper is always better
    assert fit_temperature(margins, [1, 1, 0, 0]).temperature == TEMPERATURE_BOUNDS[1]  # flatter is always better
