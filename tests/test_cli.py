"""The `sentiment-ray` command line: predict, evaluate, and the one-line errors for bad input."""

import json
import sys
import time

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
    (["predict", "--adapter", "{adapter}", "--threshold", "2", "hello"], "--threshold must be in [0, 1]"),
    (["score", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out", "--adapter", "{adapter}",
      "--keep-columns", "text,text"], "keep_columns names ['text'] more than once"),
    (["score", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out", "--adapter", "{adapter}",
      "--id-column", "label"], "id_column 'label' would collide with the prediction column"),
    (["score", "--input", "{tmp}/in.parquet", "--output", "{tmp}/out", "--adapter", "{adapter}",
      "prompt.max_length=256"], "prompt.max_length=256 (the adapter's: 40): the adapter "),
])
def test_bad_input_exits_2_with_a_one_line_message(tmp_path, random_adapter, capsys, argv, message):
    write_reviews(tmp_path / "in.parquet", ["x"], ids=["a"])
    argv = [a.format(tmp=tmp_path, adapter=random_adapter) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("sentiment-ray ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_finetune_exits_130_with_one_line(monkeypatch, capsys, tmp_path):
    from sentiment_ray.training import job as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_finetune", interrupted)
    code = main(["finetune", "--config", "configs/finetune/tiny_test.yaml", f"output_dir={tmp_path / 'a'}",
                 f"data.train={tmp_path / 't.parquet'}"])
    err = capsys.readouterr().err
    assert code == 130 and len(err.strip().splitlines()) == 1 and err.startswith("sentiment-ray finetune: interrupted")


@pytest.mark.parametrize("command", ["score", "predict", "export"])
def test_an_adapter_whose_weights_do_not_match_its_config_exits_2_before_ray(command, random_adapter, tmp_path,
                                                                             capsys, ray_must_not_start):
    """LoRA rank 4 weights with `r: 8` in adapter_config.json: one line naming the file, not peft's size mismatch
    from inside the actors."""
    import json
    import shutil

    adapter = shutil.copytree(random_adapter, tmp_path / "adapter")
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    write_reviews(tmp_path / "in.parquet", ["x"], ids=["a"])
    argv = {"score": ["score", "--input", f"{tmp_path}/in.parquet", "--output", f"{tmp_path}/out"],
            "predict": ["predict", "hello"], "export": ["export", "--output", f"{tmp_path}/out"]}[command]
    assert main([*argv, "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sentiment-ray {command}: error: {adapter}/adapter_model.safetensors: LoRA rank 4 weights")
    assert f"but {config} says r: 8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_sigterm_during_finetune_exits_143_with_one_line_and_the_handler_is_put_back(monkeypatch, capsys, tmp_path):
    """SIGTERM (KubeRay, `ray job stop`) ends a command as Ctrl-C does, also after ray.init has installed Ray's own
    SIGTERM handler (sys.exit(15), no word of what to do next) in between."""
    import os
    import signal

    from sentiment_ray.ops.signals import keep_sigterm_handler
    from sentiment_ray.training import job as train

    @keep_sigterm_handler()
    def ray_init():  # what ray.init does to SIGTERM
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    def terminated(*args, **kwargs):
        ray_init()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises in this frame at once
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train, "run_finetune", terminated)
    code = main(["finetune", "--config", "configs/finetune/tiny_test.yaml", f"output_dir={tmp_path / 'a'}",
                 f"data.train={tmp_path / 't.parquet'}"])
    err = capsys.readouterr().err
    assert code == 143 and err.strip().splitlines() == [
        "sentiment-ray finetune: terminated (SIGTERM); rerun with the same ray.run_name and ray.storage_path to "
        "continue from the last checkpoint (without ray.run_name the run starts over)"]
    assert signal.getsignal(signal.SIGTERM) is before
