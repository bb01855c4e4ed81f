import pytest

from sentiment_ray.model.labels import LabelError, normalize_label, normalize_labels


@pytest.mark.parametrize("value, expected", [
    (0, 0), (1, 1), (True, 1), (False, 0), (1.0, 1), ("0", 0), ("1", 1),
    ("negative", 0), ("Positive", 1), (" NEG ", 0), ("pos", 1),
])
def test_accepted_values(value, expected):
    assert normalize_label(value) == expected


@pytest.mark.parametrize("value", [2, -1, 0.5, "neutral", "", None])
def test_values_outside_the_two_classes_are_refused(value):
    with pytest.raises(LabelError):
        normalize_label(value)


def test_column_error_names_where_row_and_id():
    with pytest.raises(LabelError, match=r"train\.parquet: row 2 \(id 'c'\): label 'meh'"):
        normalize_labels([1, 0, "meh"], where="train.parquet", ids=["a", "b", "c"])
