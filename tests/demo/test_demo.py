"""The demo's real path at a tiny size: SmolLM2 from the PyPI wheel (checksum, GGUF conversion: the
`embedded_model` fixture runs them, once per test run), local Ray, zero-shot scoring, finetune, scoring with the
adapter, evaluation."""

import json
from pathlib import Path

import pytest

from sentiment_ray.demo.job import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_end_to_end_small(ray_session, embedded_model, tmp_path, capsys):
    # embedded_model: SmolLM2 downloaded, checked and converted once for the test run (tests/conftest.py); the demo
    # finds it in its cache, as a second `make demo` does.
    # 8 training rows are one step of the demo's batch, 4 dev reviews one scoring batch: on 2 busy cores a SmolLM2 step
    # takes ~30 s and a review ~1 s to score, and the path is the same at any size.
    summary = run_demo(tmp_path / "demo", train_rows=8, eval_rows=4)
    captured = capsys.readouterr()
    out = captured.out
    assert "zero-shot" in out and "finetuned" in out
    # One screen: the five steps and the table; Ray's and the workers' output went to the log file, named last.
    console = (captured.out + captured.err).splitlines()
    log_file = Path(summary["run_dir"]) / "demo.log"
    assert len(console) <= 40, "\n".join(console)
    assert out.splitlines()[-1] == f"full log (Ray, workers, debug lines): {log_file}"
    assert [line[:5] for line in console if line.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    log = log_file.read_text()
    assert "DEBUG sentiment_ray.scoring.stages: scored a batch of" in log  # a scoring actor's debug line
    assert "INFO sentiment_ray.training.job: adapter written to" in log  # the driver's lines
    assert "(MapWorker(MapBatches(ScoreStage)) pid=" in log  # the workers' output, forwarded by Ray
    for phase in ("zero_shot", "finetuned"):
        assert 0.0 <= summary[phase]["accuracy"] <= 1.0 and summary[phase]["rows_per_second"] > 0
    run_dir = tmp_path / "demo" / summary["run_dir"].split("/")[-1]
    assert json.loads((run_dir / "summary.json").read_text())["eval_rows"] == 4
    assert (run_dir / "finetuned" / "metrics.json").exists() and (run_dir / "adapter" / "sentiment_ray.json").exists()
    # SmolLM2's real BPE: the label words are single tokens and the adapter recorded them.
    meta = json.loads((run_dir / "adapter" / "sentiment_ray.json").read_text())
    assert meta["label_token_ids"] == [3524, 2731]  # " negative", " positive"
    assert meta["data"]["rows"] == 8 and meta["metrics"]["steps"] == 1
    # The embedded model's cache path is what loads it; the hub id is what the shareable files name.
    assert meta["base_model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model"].startswith("/")
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (run_dir / "adapter" / "README.md").read_text()
