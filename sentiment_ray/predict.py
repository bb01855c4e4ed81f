"""Label a handful of texts in-process: the same scorer as the Ray Data job, without Ray.

Every text gets a result: a text that cannot be scored (empty, invalid UTF-8, one that makes the model raise)
comes back marked with its status (and `error`), never as an exception that loses the others' predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

from sentiment_ray.config import ModelConfig
from sentiment_ray.model.prompt import PromptSpec
from sentiment_ray.model.scorer import SentimentScorer, check_loadable, score_with_retry


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str | None  # "negative" / "positive"; None when not scored (status says why)
    score: float | None  # probability of positive
    status: str  # scorer.ROW_STATUSES
    error: str | None = None  # why an invalid_utf8 or error text was not scored

    @property
    def probability(self) -> float | None:
        """Probability of the predicted label."""
        if self.score is None:
            return None
        return self.score if self.label == "positive" else 1.0 - self.score


def load_predictor(adapter: str | None, model: ModelConfig | None = None,
                   prompt: PromptSpec | None = None) -> SentimentScorer:
    model = model or ModelConfig(name_or_path="")
    check_loadable(adapter, model)  # a corrupt adapter or missing base: one AdapterError, not a loader traceback
    return SentimentScorer.load(adapter, model, prompt or PromptSpec())


def _quiet(_: str) -> None:
    """The retries' progress lines are for long jobs; here the marked Prediction says what happened."""


def predict(texts: list[str], adapter: str | None = None, *, scorer: SentimentScorer | None = None,
            model: ModelConfig | None = None, batch_size: int = 16,
            threshold: float | None = None) -> list[Prediction]:
    """`predict(["This movie was truly inspiring"], adapter="adapters/imdb")` → [Prediction(label="positive", ...)].

    A label is positive when its score >= `threshold`; None: the threshold stored with the adapter (else 0.5),
    as `score` does. The score is the adapter's calibrated probability (its stored temperature applied)."""
    scorer = scorer or load_predictor(adapter, model)
    threshold = scorer.threshold if threshold is None else threshold
    out: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        result = score_with_retry(scorer.score_texts, chunk, on_retry=_quiet)
        out += [Prediction(*row)
                for row in zip(chunk, result.labels(threshold), result.scores, result.statuses, result.errors)]
    return out
