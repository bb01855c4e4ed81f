"""Label a handful of texts in-process: the same scorer as the Ray Data job, without Ray."""

from __future__ import annotations

from dataclasses import dataclass

from sentiment_ray.config import ModelConfig
from sentiment_ray.prompt import PromptSpec
from sentiment_ray.scorer import SentimentScorer


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str | None  # "negative" / "positive"; None for empty text
    score: float | None  # probability of positive
    status: str

    @property
    def probability(self) -> float | None:
        """Probability of the predicted label."""
        if self.score is None:
            return None
        return self.score if self.label == "positive" else 1.0 - self.score


def load_predictor(adapter: str | None, model: ModelConfig | None = None, prompt: PromptSpec | None = None) -> SentimentScorer:
    return SentimentScorer.load(adapter, model or ModelConfig(name_or_path=""), prompt or PromptSpec())


def predict(texts: list[str], adapter: str | None = None, *, scorer: SentimentScorer | None = None,
            model: ModelConfig | None = None, batch_size: int = 16) -> list[Prediction]:
    """`predict(["This movie was truly inspiring"], adapter="adapters/imdb")` → [Prediction(label="positive", ...)]."""
    scorer = scorer or load_predictor(adapter, model)
    out: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        result = scorer.score_texts(chunk)
        out += [Prediction(t, lab, s, st) for t, lab, s, st in zip(chunk, result.labels, result.scores, result.statuses)]
    return out
