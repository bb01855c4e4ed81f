"""The two sentiment classes and the normalisation of user label values onto them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

NEGATIVE, POSITIVE = 0, 1
CLASS_NAMES = ("negative", "positive")

_ACCEPTED = {
    0: NEGATIVE, 1: POSITIVE,
    "0": NEGATIVE, "1": POSITIVE,
    "negative": NEGATIVE, "positive": POSITIVE,
    "neg": NEGATIVE, "pos": POSITIVE,
}


class LabelError(ValueError):
    """A label value outside the two classes."""


def normalize_label(value: object) -> int:
    """Map one label value (0/1, True/False, "negative"/"positive", any case) to 0 or 1."""
    key = value
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        key = int(value)
    elif isinstance(value, str):
        key = value.strip().lower()
    try:
        return _ACCEPTED[key]  # type: ignore[index]
    except (KeyError, TypeError):
        from sentiment_ray.io.errors import quoted

        raise LabelError(f"label {quoted(value)} is not one of 0/1 or 'negative'/'positive'") from None


def normalize_labels(values: Iterable[object], *, where: str = "", ids: Sequence[object] | None = None,
                     first_row: int = 0) -> list[int]:
    """Normalise a column of labels; the error names `where` (file/column) and the first offending row
    (`first_row` + its index: the values may be one batch of a file read in batches)."""
    out = []
    for index, value in enumerate(values):
        try:
            out.append(normalize_label(value))
        except LabelError as exc:
            row = first_row + index
            from sentiment_ray.io.errors import quoted

            at = f" (id {quoted(ids[index])})" if ids is not None else ""
            raise LabelError(f"{where}: row {row}{at}: {exc}" if where else f"row {row}{at}: {exc}") from None
    return out
