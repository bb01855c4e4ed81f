"""Binary classification metrics in numpy: the confusion counts, accuracy, precision, recall, F1, ROC AUC and the
ROC curve, with scikit-learn's definitions (positive class 1, `zero_division=0`).

Why not scikit-learn: when it is installed, transformers imports `sklearn.metrics` (and with it scipy) whenever
a tokenizer or model class is first loaded (`transformers.generation.candidate_generator`), ~0.9 s of CPU in every
process that does so: the driver, every tokenizing and scoring actor, every training worker. These seven
functions were all this project used it for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConfusionCounts:
    tn: int
    fp: int
    fn: int
    tp: int

    @classmethod
    def of(cls, y_true, y_pred) -> ConfusionCounts:
        y_true = np.asarray(y_true, dtype=np.int64)
        y_pred = np.asarray(y_pred, dtype=np.int64)
        positive, predicted = y_true == 1, y_pred == 1
        return cls(tn=int(np.sum(~positive & ~predicted)), fp=int(np.sum(~positive & predicted)),
                   fn=int(np.sum(positive & ~predicted)), tp=int(np.sum(positive & predicted)))

    @property
    def matrix(self) -> np.ndarray:
        """[[tn, fp], [fn, tp]]: rows are the true class, columns the predicted one (sklearn's layout)."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)

    @property
    def accuracy(self) -> float:
        total = self.tn + self.fp + self.fn + self.tp
        return (self.tp + self.tn) / total if total else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative, ties
    counting half (the Mann-Whitney statistic from mid-ranks, equal to the trapezoids under the full curve).
    Both classes must be present."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(np.sum(y_true == 1))
    negatives = y_true.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both classes")
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # tied scores share the mean of the ranks they span (1-based)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y_true == 1].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates, thresholds) at each distinct score, highest first, starting at
    (0, 0) with threshold +inf. Both classes must be present."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    ordered, labels = scores[order], (y_true[order] == 1).astype(np.int64)
    last_of_each = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), ordered.size - 1]
    true_positives = np.cumsum(labels)[last_of_each]
    false_positives = (last_of_each + 1) - true_positives
    if true_positives[-1] == 0 or false_positives[-1] == 0:
        raise ValueError("a ROC curve needs both classes")
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    return fpr, tpr, np.r_[np.inf, ordered[last_of_each]]
