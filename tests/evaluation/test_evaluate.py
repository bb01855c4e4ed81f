import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.config import ConfigError
from sentiment_ray.evaluation.job import (
    compute_metrics,
    evaluate,
    format_metrics,
    join_with_labels,
    load_scored,
    write_plots,
)
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.outputs import OutputExistsError
from sentiment_ray.model.labels import LabelError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-checked example. At threshold 0.5 the predictions are [1,1,0,0, 0,0,0,0]:
# tp=2 fn=2 fp=0 tn=4 -> accuracy 6/8, precision 1, recall 0.5, f1 2/3.
# AUC over 16 (pos, neg) pairs, ties count 1/2: 0.9 -> 4, 0.8 -> 4, 0.4 -> 3.5, 0.3 -> 2.5 = 14/16.
Y_TRUE = [1, 1, 1, 1, 0, 0, 0, 0]
SCORES = [0.9, 0.8, 0.4, 0.3, 0.3, 0.2, 0.1, 0.4]


def write_parquet(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def scored_columns(ids, scores, status=None, predicted=None):
    status = status or ["ok" if s is not None else "empty_text" for s in scores]
    predicted = predicted or [None if s is None else ("positive" if s >= 0.5 else "negative") for s in scores]
    return dict(
        id=ids,
        label=predicted,
        label_id=pa.array([None if p is None else int(p == "positive") for p in predicted], pa.int64()),
        score=pa.array(scores, pa.float64()),
        adapter=["adapter-1"] * len(ids),
        status=status,
    )


@pytest.fixture
def example(tmp_path):
    """Scored folder (two files + a manifest) and a labels file, in a different order."""
    ids = [f"r{i}" for i in range(8)]
    scored_dir = tmp_path / "scored"
    cols = scored_columns(ids, SCORES)
    table = pa.table(cols)
    scored_dir.mkdir()
    pq.write_table(table.slice(0, 5), scored_dir / "part-0.parquet")
    pq.write_table(table.slice(5), scored_dir / "part-1.parquet")
    (scored_dir / "_sentiment_ray_manifest.json").write_text("{}")
    order = [3, 7, 0, 5, 1, 6, 2, 4]
    names = ["negative", "positive"]
    labels = write_parquet(tmp_path / "labels.parquet",
                           id=[ids[i] for i in order], label=[names[Y_TRUE[i]] for i in order])
    return scored_dir, labels


# --- compute_metrics -------------------------------------------------------------------------

def test_metrics_hand_computed():
    m = compute_metrics(Y_TRUE, SCORES)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(14 / 16)
    assert m["confusion_matrix"] == {"labels": ["negative", "positive"], "matrix": [[4, 0], [2, 2]]}
    assert (m["n"], m["n_positive"], m["threshold"]) == (8, 4, 0.5)
    json.dumps(m)  # plain Python types only
    assert type(m["accuracy"]) is float and type(m["confusion_matrix"]["matrix"][0][0]) is int


def test_threshold_is_inclusive():
    m = compute_metrics(Y_TRUE, SCORES, threshold=0.3)
    # score >= 0.3 is positive: all four positives, plus the negatives at 0.3 and 0.4.
    assert m["confusion_matrix"]["matrix"] == [[2, 2], [0, 4]]
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(1.0)
    assert m["roc_auc"] == pytest.approx(14 / 16)  # AUC does not depend on the threshold


def test_perfect_and_inverted_predictions():
    y = [0, 0, 1, 1]
    perfect = compute_metrics(y, [0.1, 0.2, 0.8, 0.9])
    assert perfect["accuracy"] == perfect["f1"] == perfect["roc_auc"] == 1.0
    inverted = compute_metrics(y, [0.9, 0.8, 0.2, 0.1])
    assert inverted["accuracy"] == 0.0
    assert inverted["roc_auc"] == 0.0
    assert inverted["precision"] == inverted["recall"] == inverted["f1"] == 0.0
    assert inverted["confusion_matrix"]["matrix"] == [[0, 2], [2, 0]]


def test_auc_none_with_one_class():
    m = compute_metrics([1, 1, 1], [0.9, 0.4, 0.7])
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["matrix"] == [[0, 0], [1, 2]]


def test_no_rows_is_an_error():
    with pytest.raises(InputError, match="no scored rows"):
        compute_metrics([], [])


# --- load_scored -----------------------------------------------------------------------------

def test_load_scored_reads_all_files_and_ignores_manifest(example):
    scored_dir, _ = example
    table = load_scored(scored_dir)
    assert table.num_rows == 8
    assert sorted(table.column("id").to_pylist()) == [f"r{i}" for i in range(8)]
    assert load_scored(scored_dir / "part-*.parquet").num_rows == 8


def test_load_scored_nothing_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no Parquet files match '.*/empty'"):
        load_scored(tmp_path / "empty")
    with pytest.raises(InputError, match=r"no Parquet files match '.*/nope'"):
        load_scored(tmp_path / "nope")


def test_load_scored_bad_file_named(tmp_path):
    scored_dir = tmp_path / "scored"
    write_parquet(scored_dir / "part-0.parquet", **scored_columns(["a"], [0.5]))
    (scored_dir / "part-1.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match=r"part-1\.parquet: not a readable Parquet file"):
        load_scored(scored_dir)


def test_load_scored_missing_column_named(tmp_path):
    cols = scored_columns(["a"], [0.5])
    del cols["score"]
    write_parquet(tmp_path / "scored" / "part-0.parquet", **cols)
    with pytest.raises(InputError, match=r"part-0\.parquet: no score column 'score'"):
        load_scored(tmp_path / "scored")


# --- join_with_labels ------------------------------------------------------------------------

def test_join_matches_shuffled_ids_and_uses_truth_from_labels(tmp_path):
    ids = ["a", "b", "c", "d"]
    # The scored "label" column is the (here deliberately wrong) prediction; it must not be used as truth.
    scored = pa.table(scored_columns(ids, [0.9, 0.2, 0.7, 0.1],
                                     predicted=["negative", "positive", "negative", "positive"]))
    labels = write_parquet(tmp_path / "labels.parquet",
                           id=["d", "extra", "b", "a", "c"], label=["0", "1", "positive", "POSITIVE", "negative"])
    got_ids, y_true, scores, n_unscored = join_with_labels(scored, labels)
    assert got_ids == ids
    assert y_true.tolist() == [1, 1, 0, 0]
    assert scores.tolist() == [0.9, 0.2, 0.7, 0.1]
    assert n_unscored == 0


def test_join_custom_columns_and_int_vs_string_ids(tmp_path):
    scored = pa.table(scored_columns(["1", "2"], [0.8, 0.3]))
    scored = scored.rename_columns(["review_id" if c == "id" else c for c in scored.column_names])
    labels = write_parquet(tmp_path / "labels.parquet", review_id=[2, 1], sentiment=["neg", "pos"])
    _, y_true, _, _ = join_with_labels(scored, labels, id_column="review_id", label_column="sentiment")
    assert y_true.tolist() == [1, 0]


def test_join_labels_from_folder(tmp_path):
    scored = pa.table(scored_columns(["a", "b", "c"], [0.9, 0.2, 0.6]))
    write_parquet(tmp_path / "labels" / "p0.parquet", id=["c"], label=[0])
    write_parquet(tmp_path / "labels" / "p1.parquet", id=["a", "b"], label=[1, 0])
    _, y_true, _, _ = join_with_labels(scored, tmp_path / "labels")
    assert y_true.tolist() == [1, 0, 0]


def test_missing_label_ids(tmp_path):
    ids = [f"x{i}" for i in range(8)]
    scored = pa.table(scored_columns(ids, [0.5] * 8))
    labels = write_parquet(tmp_path / "labels.parquet", id=["x0"], label=[1])
    with pytest.raises(InputError) as err:
        join_with_labels(scored, labels)
    msg = str(err.value)
    assert msg.startswith(f"7 scored 'id' values have no label in {labels}, e.g. ")
    assert "'x1'" in msg and "'x5'" in msg and "'x6'" not in msg  # at most 5 examples


def test_duplicate_ids_in_labels(tmp_path):
    scored = pa.table(scored_columns(["a", "b"], [0.5, 0.5]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "b", "b"], label=[1, 0, 1])
    with pytest.raises(InputError, match=r"labels .*labels\.parquet: 1 duplicate 'id' values, e\.g\. \['b'\]"):
        join_with_labels(scored, labels)


def test_duplicate_ids_in_scored(tmp_path):
    scored = pa.table(scored_columns(["a", "a", "b"], [0.5, 0.6, 0.5]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "b"], label=[1, 0])
    with pytest.raises(InputError, match=r"^scored output: 1 duplicate 'id' values, e\.g\. \['a'\]$"):
        join_with_labels(scored, labels)


def test_bad_label_value_names_file_and_row(tmp_path):
    scored = pa.table(scored_columns(["a", "b", "c"], [0.5, 0.5, 0.5]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "b", "c"], label=["positive", "negative", "meh"])
    with pytest.raises(LabelError) as err:
        join_with_labels(scored, labels)
    msg = str(err.value)
    assert "labels.parquet" in msg and "row 2" in msg and "'c'" in msg and "'meh'" in msg


def test_missing_label_column_named(tmp_path):
    scored = pa.table(scored_columns(["a"], [0.5]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a"], truth=[1])
    with pytest.raises(InputError, match=r"labels\.parquet: no label column 'label' \(columns: \['id', 'truth'\]\)"):
        join_with_labels(scored, labels)


def test_missing_id_column_named(tmp_path):
    scored = pa.table(scored_columns(["a"], [0.5]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a"], label=[1])
    with pytest.raises(InputError, match="scored output is missing id column 'doc_id'"):
        join_with_labels(scored, labels, id_column="doc_id")


def test_null_ids_on_either_side(tmp_path):
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", None, "c", None], label=[1, 0, 1, 0])
    with pytest.raises(InputError, match=rf"^{labels}: column 'id' is null in 2 row\(s\), e\.g\. rows \[1, 3\]; "
                                         "every label needs an id"):
        join_with_labels(pa.table(scored_columns(["a", "c"], [0.5, 0.5])), labels)
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "c"], label=[1, 0])
    with pytest.raises(InputError, match=r"^scored output: column 'id' is null in 1 row\(s\), e\.g\. rows \[0\]; "
                                         "every scored row needs an id"):
        join_with_labels(pa.table(scored_columns([None, "c"], [0.5, 0.5])), labels)


def test_no_scored_rows_to_evaluate(tmp_path):
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "b"], label=[1, 0])
    scored = pa.table(scored_columns(["a", "b"], [None, None], status=["empty_text", "error"]))
    with pytest.raises(InputError, match=r"^scored output: no scored rows to evaluate \(2 rows, statuses "
                                         r"\{'empty_text': 1, 'error': 1\}\)$"):
        join_with_labels(scored, labels)
    with pytest.raises(InputError, match=r"^scored output: no scored rows to evaluate \(0 rows\)$"):
        join_with_labels(pa.table(scored_columns([], [])).cast(pa.table(scored_columns(["a"], [0.5])).schema), labels)


def test_unreadable_labels_and_bad_bytes_are_named(tmp_path):
    scored = pa.table(scored_columns(["a"], [0.5]))
    broken = tmp_path / "labels.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=rf"^{broken}: not a readable Parquet file \(.+\)$"):
        join_with_labels(scored, broken)
    ids = pa.array([b"a", b"b\xff"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ids, "label": [1, 0]}), broken)
    with pytest.raises(InputError, match=rf"^{broken}: column 'id' row 1: invalid UTF-8 byte 0xff at "
                                         r"byte 1;"):
        join_with_labels(scored, broken)


def test_scored_files_that_do_not_fit_together(tmp_path):
    write_parquet(tmp_path / "scored" / "part-0.parquet", **scored_columns(["a"], [0.5]))
    write_parquet(tmp_path / "scored" / "part-1.parquet", **{**scored_columns(["b"], [0.5]), "id": [7]})
    with pytest.raises(InputError, match=rf"^{tmp_path / 'scored'}: the scored files do not share one set of columns"):
        load_scored(tmp_path / "scored")


def test_unscored_rows_excluded_and_counted(tmp_path):
    # "c" is unscored and has no label at all: it must neither count in metrics nor be reported missing.
    scored = pa.table(scored_columns(["a", "b", "c", "d"], [0.9, None, None, 0.2]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "b", "d"], label=[1, 1, 0])
    ids, y_true, scores, n_unscored = join_with_labels(scored, labels)
    assert ids == ["a", "d"]
    assert y_true.tolist() == [1, 0]
    assert scores.tolist() == [0.9, 0.2]
    assert n_unscored == 2


# --- plots and evaluate ----------------------------------------------------------------------

def test_write_plots_are_png(tmp_path):
    paths = write_plots(Y_TRUE, SCORES, tmp_path / "plots")
    assert [p.name for p in paths] == ["confusion_matrix.png", "score_histogram.png", "reliability.png",
                                       "roc_curve.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_evaluate_writes_metrics_and_plots(example, tmp_path):
    scored_dir, labels = example
    out = tmp_path / "eval"
    metrics = evaluate(scored_dir, labels, out)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["roc_auc"] == pytest.approx(14 / 16)
    assert metrics["n_unscored"] == 0
    assert metrics["scored_path"] == str(scored_dir) and metrics["labels_path"] == str(labels)
    written = json.loads((out / "metrics.json").read_text())
    # metrics.json lists every file of the output: all that a later --overwrite may delete
    assert written.pop("files_written") == sorted(p.name for p in out.iterdir())
    assert written == metrics
    for name in ("confusion_matrix.png", "score_histogram.png", "reliability.png", "roc_curve.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    assert not list(tmp_path.glob(".eval*"))  # no staging folder left beside it
    # Calibration beside the accuracy: the values of sentiment_ray/training/calibration.py on the same rows.
    from sentiment_ray.training.calibration import brier_score, expected_calibration_error

    y_true, scores = Y_TRUE, SCORES
    assert metrics["ece"] == pytest.approx(expected_calibration_error(y_true, scores)) and metrics["ece"] > 0
    assert metrics["brier"] == pytest.approx(brier_score(y_true, scores))
    assert metrics["best_threshold"]["accuracy"]["value"] >= metrics["accuracy"]


def test_evaluate_refuses_to_overwrite(example, tmp_path):
    scored_dir, labels = example
    out = tmp_path / "eval"
    evaluate(scored_dir, labels, out)
    (out / "metrics.json").write_text('{"marker": true}')
    with pytest.raises(OutputExistsError, match=f"^output {out} already exists; choose a new path or pass "
                                                "--overwrite to replace it$"):
        evaluate(scored_dir, labels, out)
    assert json.loads((out / "metrics.json").read_text()) == {"marker": True}
    evaluate(scored_dir, labels, out, overwrite=True)  # a marker of an earlier release: known names only
    assert json.loads((out / "metrics.json").read_text())["n"] == 8
    (out / "my-notes.txt").write_text("mine")  # beside an evaluation: the output is no longer the tool's alone
    with pytest.raises(OutputExistsError, match=rf"^output {out} holds 1 entry not written by sentiment-ray, e\.g\. "
                                                r"my-notes\.txt, beside the earlier output of sentiment-ray"):
        evaluate(scored_dir, labels, out, overwrite=True)
    assert (out / "my-notes.txt").read_text() == "mine"
    (out / "my-notes.txt").unlink()
    evaluate(scored_dir, labels, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "metrics.json", "reliability.png",
                                                     "roc_curve.png", "score_histogram.png"]


def test_evaluate_never_writes_into_a_folder_of_other_things(example, tmp_path):
    scored_dir, labels = example
    out = tmp_path / "results"
    out.mkdir()
    (out / "confusion_matrix.png").write_bytes(b"the user's own figure")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=rf"^output {out} holds 1 entry not written by sentiment-ray, "
                                                    r"e\.g\. confusion_matrix\.png; choose another path"):
            evaluate(scored_dir, labels, out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["confusion_matrix.png"]
    assert (out / "confusion_matrix.png").read_bytes() == b"the user's own figure"


def test_evaluate_output_may_not_overlap_its_inputs(example, tmp_path):
    scored_dir, labels = example
    before = labels.read_bytes()
    for out, message in ((labels, f"output {labels} is the --labels path {labels}"),
                         (scored_dir / "eval",
                          f"output {scored_dir / 'eval'} lies inside the --scored path {scored_dir}"),
                         # <output>/scored is evaluate's own layout (test below); the labels file is not
                         (tmp_path, f"output {tmp_path} contains the --labels path {labels}")):
        with pytest.raises(OutputExistsError, match=f"^{message}; choose an output outside the inputs$"):
            evaluate(scored_dir, labels, out, overwrite=True)
    nested = tmp_path / "runs" / "one" / "scored"
    shutil.copytree(scored_dir, nested)
    with pytest.raises(OutputExistsError, match=f"^output {tmp_path / 'runs'} contains the --scored path {nested};"):
        evaluate(nested, labels, tmp_path / "runs", overwrite=True)
    assert labels.read_bytes() == before and sorted(p.name for p in scored_dir.iterdir()) == [
        "_sentiment_ray_manifest.json", "part-0.parquet", "part-1.parquet"]


def test_evaluate_beside_its_own_scored_folder(example, tmp_path):
    """`evaluate --input` and the demo write <output>/scored first, then evaluate it into <output>."""
    scored_dir, labels = example
    run = tmp_path / "run"
    run.mkdir()
    scored_dir.rename(run / "scored")
    metrics = evaluate(run / "scored", labels, run)
    assert metrics["n"] == 8 and (run / "metrics.json").exists() and (run / "scored" / "part-0.parquet").exists()


@pytest.mark.parametrize("threshold", [7, -0.1, 1.5, float("nan")])
def test_threshold_outside_0_1_is_refused(example, tmp_path, threshold):
    scored_dir, labels = example
    with pytest.raises(ConfigError, match=r"^threshold must be in \[0, 1\] \(a score >= it is positive\), got "):
        evaluate(scored_dir, labels, tmp_path / "eval", threshold=threshold)
    assert not (tmp_path / "eval").exists()


def test_evaluate_threshold_and_unscored(tmp_path):
    write_parquet(tmp_path / "scored" / "part-0.parquet",
                  **scored_columns(["a", "b", "c"], [0.6, 0.4, None]))
    labels = write_parquet(tmp_path / "labels.parquet", id=["a", "b", "c"], label=[1, 1, 0])
    metrics = evaluate(tmp_path / "scored", labels, tmp_path / "eval", threshold=0.35)
    assert metrics["threshold"] == 0.35
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] is None
    assert (metrics["n"], metrics["n_unscored"]) == (2, 1)


def test_format_metrics():
    metrics = compute_metrics(Y_TRUE, SCORES)
    metrics["n_unscored"] = 3
    text = format_metrics(metrics)
    assert "accuracy:  0.7500" in text
    assert "ROC AUC:   0.8750" in text
    assert "F1:        0.6667" in text
    assert "unscored: 3" in text
    assert "Brier: 0.1500" in text  # (0.01 + 0.04 + 0.36 + 0.49 + 0.09 + 0.04 + 0.01 + 0.16) / 8
    # Thresholds 0.3, 0.4 and 0.8 all get 6 of 8 right: the one nearest 0.5 is reported; F1 is best at 0.3.
    assert "best threshold on these rows: accuracy 0.7500 at 0.4, F1 0.8000 at 0.3" in text
    assert "n/a" in format_metrics(compute_metrics([1, 1], [0.9, 0.8]))


def test_ids_of_one_value_but_different_types_across_files_are_duplicates_naming_both_files(tmp_path):
    scored = pa.table(scored_columns(["1", "2"], [0.8, 0.3]))
    a = write_parquet(tmp_path / "labels" / "a.parquet", id=[1, 2], label=[1, 0])
    b = write_parquet(tmp_path / "labels" / "b.parquet", id=["1"], label=[0])
    with pytest.raises(InputError, match=rf"1 duplicate 'id' values, e\.g\. \[1 in {a} and '1' in {b}\]$"):
        join_with_labels(scored, tmp_path / "labels")
    mixed = pa.table(scored_columns(["2", "3"], [0.8, 0.3]))  # a scored side as strings, labels as ints: one join
    write_parquet(tmp_path / "ints.parquet", id=[3, 2], label=[1, 0])
    assert join_with_labels(mixed, tmp_path / "ints.parquet")[1].tolist() == [0, 1]


def test_a_huge_id_is_quoted_short_in_an_error(tmp_path):
    huge = "x" * 100_000
    scored = pa.table(scored_columns([huge + str(i) for i in range(5)], [0.5] * 5))
    labels = write_parquet(tmp_path / "labels.parquet", id=["other"], label=[1])
    with pytest.raises(InputError) as err:
        join_with_labels(scored, labels)
    assert len(str(err.value)) < 1_000 and "(100003 characters)" in str(err.value)
