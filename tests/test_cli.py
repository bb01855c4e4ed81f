"""The `sentiment-ray` command line: predict, evaluate, and the one-line errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.cli import main
from sentiment_ray.predict import predict
from tests.conftest import write_reviews


def test_predict_command_prints_label_and_probability(random_adapter, capsys):
    assert main(["predict", "--adapter", str(random_adapter), "This movie was truly inspiring", ""]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    label, probability = lines[0].split()[:2]
    assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1.0
    assert "(empty_text)" in lines[1]


def test_predict_function_agrees_with_the_command(random_adapter, capsys):
    (prediction,) = predict(["This movie was truly inspiring"], str(random_adapter))
    main(["predict", "--adapter", str(random_adapter), "This movie was truly inspiring"])
    out = capsys.readouterr().out
    assert prediction.label in out and f"P(positive)={prediction.score:.4f}" in out
    assert prediction.probability == pytest.approx(max(prediction.score, 1 - prediction.score))


def test_evaluate_refuses_to_replace_metrics(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.table({"id": ["a"], "score": [0.9], "status": ["ok"]}), scored / "p.parquet")
    labels = write_reviews(tmp_path / "labels.parquet", ["t"], [1], ids=["a"])
    assert main(["evaluate", "--scored", str(scored), "--labels", str(labels), "--output", str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err and (out / "metrics.json").read_text() == "{}"


def test_evaluate_command_on_scored_output(tmp_path, capsys):
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "label": ["positive", "negative", "positive", None],
                             "label_id": [1, 0, 1, None], "score": [0.9, 0.2, 0.7, None],
                             "status": ["ok", "ok", "ok", "empty_text"], "adapter": ["x"] * 4}), scored / "p.parquet")
    labels = write_reviews(tmp_path / "labels.parquet", ["t"] * 4, [1, 0, 0, 1], ids=["a", "b", "c", "d"])
    out = tmp_path / "eval"
    assert main(["evaluate", "--scored", str(scored), "--labels", str(labels), "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["n_unscored"] == 1
    assert (out / "confusion_matrix.png").exists() and (out / "score_histogram.png").exists()
    assert "accuracy" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("argv, message", [
    (["score", "--input", "{tmp}/none-*.parquet", "--output", "{tmp}/out", "--adapter", "{adapter}"],
     "no Parquet files match"),
    (["score", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out", "--adapter", "{tmp}"],
     "not a sentiment_ray adapter"),
    (["score", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out", "--text-column", "body",
      "--adapter", "{adapter}"], "no text column 'body'"),
    (["finetune", "--config", "{tmp}/missing.yaml"], "does not exist"),
    (["predict", "hello"], "needs --adapter"),
    (["score", "--input", "{tmp}/in.parquet", "--output", "ftp://host/out", "--adapter", "{adapter}"],
     "ftp://host/out: not a path or URI this tool can read or write"),
])
def test_bad_input_exits_2_with_a_one_line_message(tmp_path, random_adapter, capsys, argv, message):
    write_reviews(tmp_path / "in.parquet", ["x"], ids=["a"])
    argv = [a.format(tmp=tmp_path, adapter=random_adapter) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("sentiment-ray ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
