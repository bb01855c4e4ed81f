"""predict() and `sentiment-ray predict`: every text gets a result, a bad one is marked, never fatal for the others."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from sentiment_ray.cli import main
from sentiment_ray.config import ModelConfig
from sentiment_ray.model import scorer as scorer_module
from sentiment_ray.predict import load_predictor, predict
from tests.conftest import REPO_ROOT

MODEL = ModelConfig(name_or_path="", backend="hf", dtype="float32")
# what the bytes b"bad \xff" on a command line become in sys.argv (Python decodes argv with surrogateescape)
INVALID_ARGV_TEXT = os.fsdecode(b"bad \xff")


def _fails_on_boom(real_score_texts):
    def score_texts(self, texts):
        if any(isinstance(t, str) and "BOOM" in t for t in texts):
            raise RuntimeError("kaboom")
        return real_score_texts(self, texts)
    return score_texts


def test_bad_texts_are_marked_and_the_others_still_predicted(random_adapter, monkeypatch):
    scorer = load_predictor(str(random_adapter), MODEL)
    clean = predict(["great film", "awful"], scorer=scorer)
    monkeypatch.setattr(scorer_module.SentimentScorer, "score_texts",
                        _fails_on_boom(scorer_module.SentimentScorer.score_texts))
    texts = ["great film", "", INVALID_ARGV_TEXT, "BOOM goes this one", "   ", "awful"]
    results = predict(texts, scorer=scorer, batch_size=4)
    assert [r.text for r in results] == texts
    assert [r.status for r in results] == ["ok", "empty_text", "invalid_utf8", "error", "empty_text", "ok"]
    assert [r.error for r in results] == [None, None, "invalid UTF-8 byte 0xff at byte 4", "RuntimeError: kaboom",
                                          None, None]
    assert [r.label for r in results[1:5]] == [None] * 4 and [r.score for r in results[1:5]] == [None] * 4
    assert (results[0].score, results[5].score) == (clean[0].score, clean[1].score)  # same batch-mates or not


def test_the_command_prints_one_line_per_text_bad_ones_included(random_adapter, monkeypatch, capsys):
    (good,) = predict(["great film"], str(random_adapter))
    monkeypatch.setattr(scorer_module.SentimentScorer, "score_texts",
                        _fails_on_boom(scorer_module.SentimentScorer.score_texts))
    argv = ["predict", "--adapter", str(random_adapter), "great film", "", INVALID_ARGV_TEXT, "BOOM", "two\nlines"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0] == f"{good.label:>8}  {good.probability:6.4f}  P(positive)={good.score:.4f}  great film"
    assert lines[1:4] == [f"{'-':>8}  {'':>6}  (empty_text)  ",
                          f"{'-':>8}  {'':>6}  (invalid_utf8: invalid UTF-8 byte 0xff at byte 4)  bad \\xff",
                          f"{'-':>8}  {'':>6}  (error: RuntimeError: kaboom)  BOOM"]
    assert lines[4].endswith("  two\\nlines") and lines[4].split()[0] in ("negative", "positive")


def test_invalid_bytes_on_a_real_command_line(random_adapter):
    """The bytes reach the process as argv bytes, and the line goes out through a real stdout."""
    result = subprocess.run([sys.executable, "-m", "sentiment_ray.cli", "predict", "--adapter", str(random_adapter),
                             b"bad \xff", "fine film"], capture_output=True, cwd=REPO_ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.decode().splitlines()
    assert lines[0] == f"{'-':>8}  {'':>6}  (invalid_utf8: invalid UTF-8 byte 0xff at byte 4)  bad \\xff"
    assert len(lines) == 2 and lines[1].endswith("  fine film") and "P(positive)=" in lines[1]


def _checksums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", ["truncated_weights", "missing_base", "zero_shot_missing_base"])
def test_an_unloadable_model_is_one_line_and_exit_2(random_adapter, tmp_path, capsys, case):
    adapter = shutil.copytree(random_adapter, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    if case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        argv, message = ["--adapter", str(adapter)], f"{weights}: not readable safetensors"
    elif case == "missing_base":
        recorded = json.loads((adapter / "sentiment_ray.json").read_text())
        recorded["base_model"] = "/nowhere/base-model"
        (adapter / "sentiment_ray.json").write_text(json.dumps(recorded))
        argv = ["--adapter", str(adapter)]
        message = (f"base model /nowhere/base-model recorded in {adapter / 'sentiment_ray.json'} cannot be found: "
                   "no such folder; pass --base-model to name it")
    else:
        argv = ["--zero-shot", "--base-model", str(tmp_path / "nope")]
        message = f"base model {tmp_path / 'nope'} cannot be found: no such folder"
    before = _checksums(adapter)
    assert main(["predict", *argv, "some text"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"sentiment-ray predict: error: {message}")
    assert _checksums(adapter) == before
