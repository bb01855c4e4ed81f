"""Temperature scaling (sentiment_ray/training/calibration.py `fit_temperature`)."""

import numpy as np
import pytest

from sentiment_ray.training.calibration import expected_calibration_error, fit_temperature


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
