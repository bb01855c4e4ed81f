"""Short excerpts of labeled reviews: what a model trained on whole IMDB reviews never sees, and users score.

An excerpt is a window of consecutive words (8 to 60 by default) of one review, with that review's label. Used
  - to build a short-text evaluation set from `dev.parquet` alone (`sentiment-ray excerpts`): deterministic for a
    seed, one excerpt per review, ids `<review id>#excerpt`;
  - in training (`data.excerpt_share`): that share of the training rows is replaced by an excerpt of itself, so
    the adapter learns short texts too without any other data.
A short window of a review does not always carry its sentiment ("The film runs 104 minutes."): that noise is the
same for every model compared on the set, and the report gives precision and recall on it, not only accuracy.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

MIN_WORDS = 8
MAX_WORDS = 60
EXCERPT_ID_SUFFIX = "#excerpt"


def excerpt(text: str, rng: np.random.Generator, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str:
    """A window of `min_words`..`max_words` consecutive words of `text` (its `<br />` breaks as spaces), chosen by
    `rng`; a text of at most `min_words` words is returned whole."""
    words = text.replace("<br />", " ").split()
    if len(words) <= min_words:
        return " ".join(words)
    length = int(rng.integers(min_words, min(max_words, len(words)) + 1))
    start = int(rng.integers(0, len(words) - length + 1))
    return " ".join(words[start:start + length])


def make_excerpt_set(input_path: str, output_path: str, seed: int = 0, text_column: str = "text",
                     id_column: str = "id", label_column: str = "label") -> int:
    """One excerpt per review of a labeled Parquet file, written to `output_path`; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sentiment_ray.io.errors import InputError
    from sentiment_ray.io.inputs import read_checked

    table = read_checked(input_path, {id_column: "id", text_column: "text", label_column: "label"},
                         strings_only=False)
    logger.debug("%s: %d labeled reviews (columns %s)", input_path, table.num_rows, table.column_names)
    rng = np.random.default_rng(seed)
    texts = table.column(text_column).to_pylist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise InputError(f"{input_path}: column {text_column!r} row {bad[0]} has no text ({len(bad)} such rows)")
    out = pa.table({
        id_column: pa.array([f"{i}{EXCERPT_ID_SUFFIX}" for i in table.column(id_column).to_pylist()], pa.string()),
        text_column: pa.array([excerpt(t, rng) for t in texts], pa.string()),
        label_column: table.column(label_column),
        "review_id": table.column(id_column),
    })
    words = sorted(len(t.split()) for t in out.column(text_column).to_pylist())
    if words:
        logger.info("%d excerpts of %d to %d words (median %d)", len(words), words[0], words[-1],
                    words[len(words) // 2])
    pq.write_table(out, output_path)
    return out.num_rows
