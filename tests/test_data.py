import pytest

from sentiment_ray.data import (
    InputError,
    fingerprint,
    load_labeled_parquet,
    resolve_parquet_files,
)
from tests.conftest import write_reviews


def test_resolve_file_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    a = write_reviews(tmp_path / "a.parquet", ["x"], [1])
    b = write_reviews(tmp_path / "sub" / "b.parquet", ["y"], [0])
    assert resolve_parquet_files(str(a)) == [str(a)]
    assert resolve_parquet_files(str(tmp_path)) == [str(a), str(b)]
    assert resolve_parquet_files(str(tmp_path / "*.parquet")) == [str(a)]


def test_no_files_match(tmp_path):
    with pytest.raises(InputError, match=r"no Parquet files match .*nothing-\*\.parquet"):
        resolve_parquet_files(str(tmp_path / "nothing-*.parquet"))


def test_unreadable_parquet_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        load_labeled_parquet(str(bad), "text", "label")


def test_missing_columns_are_named(tmp_path):
    path = write_reviews(tmp_path / "r.parquet", ["x"], [1])
    with pytest.raises(InputError, match=r"r\.parquet: no text column 'review'"):
        load_labeled_parquet(str(path), "review", "label")
    with pytest.raises(InputError, match=r"r\.parquet: no label column 'sentiment'"):
        load_labeled_parquet(str(path), "text", "sentiment")


def test_text_column_must_hold_strings(tmp_path):
    path = write_reviews(tmp_path / "r.parquet", [1, 2], [1, 0])
    with pytest.raises(InputError, match="must hold strings"):
        load_labeled_parquet(str(path), "text", "label")


@pytest.mark.parametrize("texts, message", [(["ok", None], "row 1 is null"), (["ok", "  "], "row 1 is empty")])
def test_training_refuses_null_or_empty_text(tmp_path, texts, message):
    path = write_reviews(tmp_path / "r.parquet", texts, [1, 0])
    with pytest.raises(InputError, match=rf"r\.parquet: column 'text' {message}"):
        load_labeled_parquet(str(path), "text", "label")


def test_labels_outside_the_two_classes(tmp_path):
    path = write_reviews(tmp_path / "r.parquet", ["a", "b", "c"], ["positive", "negative", "neutral"])
    with pytest.raises(InputError, match=r"r\.parquet: column 'label': row 2: label 'neutral'"):
        load_labeled_parquet(str(path), "text", "label")


def test_string_and_int_labels_load_alike(tmp_path):
    a = write_reviews(tmp_path / "a.parquet", ["x", "y"], ["positive", "negative"])
    b = write_reviews(tmp_path / "b.parquet", ["x", "y"], [1, 0])
    ta, la, _ = load_labeled_parquet(str(a), "text", "label")
    tb, lb, _ = load_labeled_parquet(str(b), "text", "label")
    assert la == lb == [1, 0] and fingerprint(ta, la) == fingerprint(tb, lb)
    assert fingerprint(ta, la) != fingerprint(ta, [0, 1])


def test_file_uris_are_listed_and_opened(tmp_path):
    from sentiment_ray.data import open_parquet

    (tmp_path / "sub").mkdir()
    write_reviews(tmp_path / "a.parquet", ["x"], [1])
    write_reviews(tmp_path / "sub" / "b.parquet", ["y", "z"], [0, 1])
    files = resolve_parquet_files(f"file://{tmp_path}")
    assert files == [f"file://{tmp_path}/a.parquet", f"file://{tmp_path}/sub/b.parquet"]
    assert open_parquet(files[1]).metadata.num_rows == 2
    with pytest.raises(InputError, match="no Parquet files match"):
        resolve_parquet_files(f"file://{tmp_path}/nothing")
