"""How far the `score` column can be read as a probability, and the threshold that suits a labeled set.

Users threshold `score` (P(positive)), so its calibration matters as much as the accuracy:
- expected calibration error (ECE): rows binned by score into 15 equal-width bins over [0, 1]; each bin's
  |fraction of true positives − mean score|, weighted by its share of rows. It reads the reliability diagram as
  one number: 0 when, among rows scored about 0.8, about 80 % are positive.
- Brier score: the mean squared difference between score and the 0/1 label (lower is better; 0.25 is a coin).
- the threshold that maximises accuracy (and the one that maximises F1) on the evaluated rows: a report, so a
  user can choose a threshold for `score --threshold` on data that is not the data they report on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    rows: int
    mean_score: float | None
    fraction_positive: float | None


def reliability_bins(y_true, scores, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1] (a score of exactly 1.0 falls in the last one)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1], right=False), 0, bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        rows = int(members.sum())
        out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), rows,
                                  float(scores[members].mean()) if rows else None,
                                  float(y_true[members].mean()) if rows else None))
    return out


def expected_calibration_error(y_true, scores, bins: int = ECE_BINS) -> float:
    return _ece(reliability_bins(y_true, scores, bins))


def _ece(bins: list[ReliabilityBin]) -> float:
    total = sum(b.rows for b in bins)
    return float(sum(b.rows / total * abs(b.fraction_positive - b.mean_score) for b in bins if b.rows))


def brier_score(y_true, scores) -> float:
    y_true = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.mean((scores - y_true) ** 2))


@dataclass(frozen=True)
class BestThreshold:
    threshold: float  # a row is positive when score >= threshold
    value: float  # the metric there


def best_thresholds(y_true, scores) -> dict[str, BestThreshold]:
    """The thresholds that maximise accuracy and F1 on these rows, over every distinct score (a row is positive
    when its score is >= the threshold); ties go to the threshold nearest 0.5."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_true = scores[order], y_true[order]
    # Predicting positive for the k highest scores, k = 0..n: counts at every cut in one pass.
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(scores) - 1]
    cuts = np.r_[0, last_of_value + 1]
    true_positives = np.r_[0, np.cumsum(sorted_true)][cuts]
    predicted_positive = cuts
    positives, n = int(y_true.sum()), len(y_true)
    true_negatives = (n - predicted_positive) - (positives - true_positives)
    accuracy = (true_positives + true_negatives) / n
    f1 = np.divide(2 * true_positives, predicted_positive + positives, out=np.zeros(len(cuts)),
                   where=(predicted_positive + positives) > 0)
    # The threshold of cut k: the lowest score predicted positive (k = 0: above every score).
    thresholds = np.r_[np.nextafter(sorted_scores[0], np.inf) if n else 1.0, sorted_scores[last_of_value]]
    thresholds = np.clip(thresholds, 0.0, 1.0)

    def best(values: np.ndarray) -> BestThreshold:
        top = np.flatnonzero(values == values.max())
        pick = top[np.argmin(np.abs(thresholds[top] - 0.5))]
        return BestThreshold(float(thresholds[pick]), float(values[pick]))

    return {"accuracy": best(accuracy), "f1": best(f1)}


def calibration_report(y_true, scores) -> dict:
    """What `evaluate` adds to metrics.json."""
    bins = reliability_bins(y_true, scores)
    return {
        "ece": _ece(bins),
        "ece_bins": ECE_BINS,
        "brier": brier_score(y_true, scores),
        "reliability": [asdict(b) for b in bins],
        "best_threshold": {name: asdict(b) for name, b in best_thresholds(y_true, scores).items()},
    }


# ------------------------------------------------------------------------------------------ temperature scaling

TEMPERATURE_BOUNDS = (0.05, 20.0)


def _negative_log_likelihood(margins: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = margins / temperature
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, computed without overflow
    return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))


@dataclass(frozen=True)
class TemperatureFit:
    """Temperature scaling: P(positive) = sigmoid(margin / temperature), margin = logit(positive) - logit(negative),
    with the one number fitted by maximum likelihood on labeled rows the adapter was not trained on. It moves
    probabilities, never their order: accuracy at 0.5, ROC AUC and rankings stay as they were."""

    temperature: float
    rows: int
    nll_before: float  # mean negative log-likelihood at temperature 1
    nll_after: float
    ece_before: float
    ece_after: float

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow at either end


def _fitted_inverse_temperature(margins: np.ndarray, labels: np.ndarray) -> float:
    """argmin over beta = 1/T in the bounds of mean(log(1 + e^(beta * a))), a = -margin for positives and
    +margin for negatives. That is convex in beta (a mean of softplus of lines), so its derivative
    mean(a * sigmoid(beta * a)) only rises, and bisecting on the derivative's sign finds the minimum to float
    precision. Why not scipy's minimize_scalar: with scipy installed, transformers imports scipy.optimize in every
    process that loads a model class (its object-detection losses): ~0.5 CPU-s in each scoring actor and training
    worker for this one search (docs/BENCHMARKS.md §23)."""
    signed = np.where(labels == 1, -margins, margins)
    low, high = 1.0 / TEMPERATURE_BOUNDS[1], 1.0 / TEMPERATURE_BOUNDS[0]

    def slope(beta: float) -> float:
        return float(np.mean(signed * _sigmoid(beta * signed)))

    if slope(low) >= 0.0:  # the likelihood falls as the temperature rises, up to its bound
        return low
    if slope(high) <= 0.0:  # it falls as the temperature falls (separable rows), down to its bound
        return high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):  # adjacent floats
            break
        if slope(middle) > 0.0:
            high = middle
        else:
            low = middle
    return 0.5 * (low + high)


def fit_temperature(margins, labels) -> TemperatureFit:
    """The temperature in TEMPERATURE_BOUNDS that minimises the held-out rows' negative log-likelihood."""
    margins = np.asarray(margins, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(margins) == 0 or len(set(labels.tolist())) < 2:
        raise ValueError(f"temperature scaling needs held-out rows of both classes, got {len(margins)} rows "
                         f"of {sorted(set(labels.tolist()))}")
    temperature = 1.0 / _fitted_inverse_temperature(margins, labels)

    def probabilities(t: float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-margins / t))

    return TemperatureFit(temperature, len(margins), _negative_log_likelihood(margins, labels, 1.0),
                          _negative_log_likelihood(margins, labels, temperature),
                          expected_calibration_error(labels, probabilities(1.0)),
                          expected_calibration_error(labels, probabilities(temperature)))
