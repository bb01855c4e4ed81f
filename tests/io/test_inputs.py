import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.config import ScoreConfig
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.inputs import input_matches, is_pattern, resolve_parquet_files, text_values
from sentiment_ray.scoring.plan import check_inputs
from sentiment_ray.training.data import load_labeled_parquet, rows_fingerprint
from tests.conftest import write_reviews


def test_resolve_file_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    a = write_reviews(tmp_path / "a.parquet", ["x"], [1])
    b = write_reviews(tmp_path / "sub" / "b.parquet", ["y"], [0])
    assert resolve_parquet_files(str(a)) == [str(a)]
    assert resolve_parquet_files(str(tmp_path)) == [str(a), str(b)]
    assert resolve_parquet_files(str(tmp_path / "*.parquet")) == [str(a)]


def test_a_folder_reads_only_the_reviews_in_it(tmp_path):
    """An earlier output, this tool's hidden work and staging folders, and `_`/`.` files are not reviews."""
    review = write_reviews(tmp_path / "reviews.parquet", ["x"], [1])
    nested = tmp_path / "2024"
    nested.mkdir()
    deeper = write_reviews(nested / "b.parquet", ["y"], [0])
    for hidden in (".scored.partial/units/u-0.parquet", ".scored.tmp-1a2b/part-00000.parquet", "_scored/part.parquet",
                   "2024/_old/p.parquet", "2024/.cache/p.parquet", "_metadata.parquet", ".hidden.parquet",
                   "2024/_c.parquet"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        write_reviews(tmp_path / hidden, ["not a review"], [1])
    (tmp_path / "_sentiment_ray_manifest.json").write_text("{}")
    assert resolve_parquet_files(str(tmp_path)) == [str(deeper), str(review)]
    assert resolve_parquet_files(f"file://{tmp_path}") == [f"file://{deeper}", f"file://{review}"]
    # a glob skips them too, and takes only the Parquet files among what it matches (not the manifest)
    assert resolve_parquet_files(str(tmp_path / "*")) == [str(deeper), str(review)]
    assert resolve_parquet_files(str(tmp_path / "**" / "*.parquet")) == [str(deeper), str(review)]
    assert resolve_parquet_files(str(tmp_path / "20*")) == [str(deeper)]  # a folder matched: its reviews
    # ... unless it spells them out; a plain path always names what it names
    assert resolve_parquet_files(str(tmp_path / "_*.parquet")) == [str(tmp_path / "_metadata.parquet")]
    assert resolve_parquet_files(str(tmp_path / "2024" / "_*.parquet")) == [str(nested / "_c.parquet")]
    assert resolve_parquet_files(str(tmp_path / "_scored")) == [str(tmp_path / "_scored" / "part.parquet")]
    assert resolve_parquet_files(str(tmp_path / ".hidden.parquet")) == [str(tmp_path / ".hidden.parquet")]


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
    assert la == lb == [1, 0] and rows_fingerprint(ta, la) == rows_fingerprint(tb, lb)
    assert rows_fingerprint(ta, la) != rows_fingerprint(ta, [0, 1])


def test_file_uris_are_listed_and_opened(tmp_path):
    from sentiment_ray.io.inputs import open_parquet

    (tmp_path / "sub").mkdir()
    write_reviews(tmp_path / "a.parquet", ["x"], [1])
    write_reviews(tmp_path / "sub" / "b.parquet", ["y", "z"], [0, 1])
    files = resolve_parquet_files(f"file://{tmp_path}")
    assert files == [f"file://{tmp_path}/a.parquet", f"file://{tmp_path}/sub/b.parquet"]
    assert open_parquet(files[1]).metadata.num_rows == 2
    with pytest.raises(InputError, match="no Parquet files match"):
        resolve_parquet_files(f"file://{tmp_path}/nothing")


def _invalid_utf8(*cells: bytes) -> pa.Array:
    return pa.array(cells, pa.binary()).view(pa.string())  # as Parquet written by other tools can hold


def test_invalid_utf8_text_names_file_column_and_row(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"text": _invalid_utf8(b"fine", b"also fine", b"bad \xff here"), "label": [1, 0, 1]}), path)
    with pytest.raises(InputError, match=rf"^{path}: column 'text' row 2: invalid UTF-8 byte 0xff at byte "
                                         r"4; fix or drop such rows first$"):
        load_labeled_parquet(str(path), "text", "label")
    pq.write_table(pa.table({"text": ["a", "b"], "label": _invalid_utf8(b"positive", b"\xc3\x28")}), path)
    with pytest.raises(InputError, match=r"r\.parquet: column 'label' row 1: invalid UTF-8 byte 0xc3 at "
                                         r"byte 0;"):
        load_labeled_parquet(str(path), "text", "label")
    large = pa.array([b"ok", b"\xfe"], pa.large_binary()).view(pa.large_string())
    pq.write_table(pa.table({"text": large, "label": [1, 0]}), path)
    with pytest.raises(InputError, match=r"column 'text' row 1: invalid UTF-8 byte 0xfe at byte 0;"):
        load_labeled_parquet(str(path), "text", "label")
    pq.write_table(pa.table({"text": _invalid_utf8(b"tr\xc3\xa8s bien", b"ok"), "label": [1, 0]}), path)
    assert load_labeled_parquet(str(path), "text", "label")[0] == ["très bien", "ok"]


def test_text_values_read_string_and_binary_columns_without_failing_on_bad_bytes():
    raw = [b"ok", b"bad \xff", None, "très".encode()]
    strings = pa.array(raw, pa.binary()).view(pa.string())  # a string column holding invalid UTF-8, as Parquet can
    with pytest.raises(UnicodeDecodeError):
        strings.to_pylist()  # what used to kill the scoring job
    expected = ["ok", "bad \udcff", None, "très"]
    assert text_values(strings) == expected
    assert text_values(pa.chunked_array([strings, strings]).slice(3, 3)) == expected[3:] + expected[:2]
    assert text_values(strings.cast(pa.large_string())) == expected
    assert text_values(pa.array(raw, pa.binary())) == expected
    assert text_values(pa.array(raw, pa.large_binary())) == expected
    assert text_values(pa.DictionaryArray.from_arrays(pa.array([1, 0, None]), strings)) == ["bad \udcff", "ok", None]
    assert text_values(pa.array([3, None])) == [3, None]  # not text at all: non_string_text downstream


def test_a_path_that_exists_is_read_as_itself_whatever_its_name_holds(tmp_path):
    """`reviews [2024].parquet` is that file, not a pattern matching `reviews 2.parquet`; only a path that does
    not exist is expanded."""
    asked = write_reviews(tmp_path / "reviews [2024].parquet", [f"r{i}" for i in range(30)])
    write_reviews(tmp_path / "reviews 2.parquet", [f"s{i}" for i in range(50)])
    starred = write_reviews(tmp_path / "a*b?.parquet", ["x"])
    assert resolve_parquet_files(str(asked)) == [str(asked)]
    uri = "file://" + urllib.parse.quote(str(asked))  # `[`, `]` and spaces are escaped in a URI
    assert resolve_parquet_files(uri) == [uri] and not is_pattern(uri)
    assert resolve_parquet_files(str(starred)) == [str(starred)]
    assert is_pattern(str(tmp_path / "reviews [2]*.parquet")) and not is_pattern(str(asked))
    assert input_matches(str(tmp_path / "reviews [2]*.parquet")) == [str(tmp_path / "reviews 2.parquet")]
    assert pq.read_table(resolve_parquet_files(str(asked))[0]).num_rows == 30
    plan_inputs = check_inputs(ScoreConfig(input=str(asked), output=str(tmp_path / "scored")).validate())
    assert plan_inputs.paths == [str(asked)] and plan_inputs.rows_in == 30  # the 30 rows asked for are scored


def test_an_output_that_an_input_pattern_would_match_is_refused(tmp_path):
    from sentiment_ray.io.outputs import OutputExistsError, refuse_overlap

    data = tmp_path / "data"
    data.mkdir()
    write_reviews(data / "a.parquet", ["x"])
    (tmp_path / "link").symlink_to(data)
    for output, pattern in ((data / "scored.parquet", data / "*.parquet"),
                            (data / "new" / "scored", tmp_path / "link" / "**" / "*.parquet"),
                            (data / "2025" / "out", data / "20*"),
                            (tmp_path / "out", tmp_path / "o*" / "x" / "*.parquet")):
        with pytest.raises(OutputExistsError, match=rf"^output {output} is matched by the score input pattern "):
            refuse_overlap(output, [str(pattern)], "score input")
    refuse_overlap(data / "scored", [str(data / "*.parquet")], "score input")  # a folder beside the files: fine
    refuse_overlap(tmp_path / "out", [str(data / "**" / "*.parquet")], "score input")
    # a name with glob characters that exists is that file: the folder beside it is no match
    write_reviews(tmp_path / "r[1].parquet", ["x"])
    refuse_overlap(tmp_path / "r1.parquet", [str(tmp_path / "r[1].parquet")], "score input")
