"""The jobs' Ray metrics, read back from the Prometheus endpoints of a local Ray cluster's nodes.

The cluster is the test session's private Ray (tests/conftest.py: one start for every module); each node's
metrics agent exports at the port Ray chose for it, which `ray.nodes()` names (`MetricsExportPort`), as
`ray start --metrics-export-port` or KubeRay's 8080 would. The agent serves what the processes on its node
recorded a few seconds late (its export interval), so every check polls the endpoints until the values are
there or a deadline passes. Runs are told apart by their `run` tag: the session's counters only grow.
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.config import FinetuneConfig, ScoreConfig, load_config
from sentiment_ray.model.tiny import synthetic_reviews
from sentiment_ray.ops.metrics import FinetuneRecorder, ScoreStageRecorder, record_units_committed
from sentiment_ray.scoring import run_scoring
from sentiment_ray.training.job import run_finetune
from tests.conftest import REPO_ROOT, write_reviews

pytestmark = pytest.mark.timeout(300)
# The agent exports every ~10 s; a dead actor's last values arrive as it exits (later on 2 busy cores).
EXPORT_DEADLINE_S = 120
PROMETHEUS = "ray_sentiment_ray_"


def scrape(ray) -> dict[str, list[tuple[dict, float]]]:
    """Every sample of our metrics on every live node: metric name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict, float]]] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(PROMETHEUS):
                    samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def values_of(samples, name: str, run: str, by: str | None = None) -> dict:
    """The run's samples of `name` summed over processes (and nodes), by the tag `by` (or under None)."""
    totals: Counter = Counter()
    for labels, value in samples.get(PROMETHEUS + name, []):
        if labels.get("run") == run:
            totals[labels.get(by) if by else None] += value
    return dict(totals)


def wait_for(ray, expected: dict[str, dict], run: str, by: dict[str, str] | None = None) -> dict:
    """Poll until each metric's values (by its tag, see values_of) equal `expected`; the last scrape."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        samples = scrape(ray)
        seen = {name: values_of(samples, name, run, (by or {}).get(name)) for name in expected}
        if seen == expected or time.monotonic() > deadline:
            assert seen == expected
            return samples
        time.sleep(1)


# ------------------------------------------------------------------------------------------------ scoring


def test_scoring_metrics_match_the_output(ray_session, random_adapter, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    texts, _ = synthetic_reviews(250, seed=5)
    write_reviews(folder / "a.parquet", texts + [""] * 10 + [None] * 5 + ["   "])
    pq.write_table(pa.table({"id": ["n0", "n1", "n2"], "text": [1, 2, 3]}), folder / "b.parquet")
    out = tmp_path / "scored"
    cfg = load_config(ScoreConfig, REPO_ROOT / "configs" / "score" / "tiny_test.yaml", [
        f"adapter={random_adapter}", f"input={folder}", f"output={out}", "model.dtype=float32", "unit_rows=64"])
    manifest = run_scoring(cfg)

    statuses = Counter(pq.read_table(out, columns=["status"]).column("status").to_pylist())
    assert statuses == {"ok": 250, "empty_text": 16, "non_string_text": 3}  # the output, as the metrics must say
    assert manifest.units.total == 6  # a.parquet: 266 rows in units of <= 64 rows (5), b.parquet: 1
    samples = wait_for(ray_session, {
        "score_rows_scored_total": {None: 250},
        "score_rows_marked_total": {"empty_text": 16, "non_string_text": 3},
        "score_units_committed_total": {None: 6},
    }, run=manifest.output, by={"score_rows_marked_total": "status"})
    rates = [v for labels, v in samples[PROMETHEUS + "score_rows_per_second"] if labels["run"] == manifest.output]
    assert 1 <= len(rates) <= 2 and all(rate > 0 for rate in rates)  # one gauge per scoring actor (pool_size 2)


# ------------------------------------------------------------------------------------------------ finetune


def test_finetune_metrics_report_the_last_step(ray_session, tiny_model_dir, synthetic_train_file, tmp_path):
    cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={synthetic_train_file}",
        f"output_dir={tmp_path / 'adapter'}", "data.limit=48", "train.batch_size=8", "train.logging_steps=2",
        "train.checkpoint_steps=0", f"ray.storage_path={tmp_path / 'ray-results'}", "ray.run_name=metrics-run"])
    result = run_finetune(cfg)
    assert result["metrics"]["steps"] == 6  # 48 rows, batch 8, one epoch

    samples = wait_for(ray_session, {"finetune_step": {None: 6}}, run="metrics-run")
    (loss,) = [v for labels, v in samples[PROMETHEUS + "finetune_loss"] if labels["run"] == "metrics-run"]
    (rate,) = [v for labels, v in samples[PROMETHEUS + "finetune_tokens_per_second"] if labels["run"] == "metrics-run"]
    assert loss > 0 and rate > 0


# ------------------------------------------------------------------------------------------------ recorders


def test_recording_outside_ray_does_nothing(tmp_path):
    """A process that never joined Ray (the scorer used in-process, a benchmark) records into nothing."""
    import subprocess
    import sys

    script = ("import ray\n"
              "from sentiment_ray.ops.metrics import FinetuneRecorder, ScoreStageRecorder, record_units_committed\n"
              "ScoreStageRecorder('no-ray').record_batch(['ok', None, 'error'], started=1.0, ended=2.0)\n"
              "record_units_committed('no-ray', 3)\n"
              "FinetuneRecorder('no-ray').record_log(step=1, loss=0.5, tokens_seen=10)\n"
              "assert not ray.is_initialized()\n"
              "print('recorded')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, check=False)
    assert (done.returncode, done.stdout) == (0, "recorded\n"), done.stderr[-2000:]


def test_a_failure_to_record_never_reaches_the_job(monkeypatch):
    from sentiment_ray.ops import metrics

    def broken():
        raise RuntimeError("no metrics today")

    monkeypatch.setattr(metrics, "score_metrics", broken)
    monkeypatch.setattr(metrics, "finetune_metrics", broken)
    ScoreStageRecorder("r").record_batch(["ok"], started=1.0, ended=2.0)
    record_units_committed("r", 1)
    FinetuneRecorder("r").record_log(step=1, loss=0.5, tokens_seen=10)


def test_the_rows_per_second_gauge_covers_a_window_of_batches(monkeypatch):
    recorded: list[float] = []

    class FakeGauge:
        def set(self, value, tags=None):
            recorded.append(value)

    class FakeCounter:
        def inc(self, value, tags=None):
            pass

    from sentiment_ray.ops import metrics

    fake = metrics.ScoreMetrics(FakeCounter(), FakeCounter(), FakeGauge(), FakeCounter())
    monkeypatch.setattr(metrics, "score_metrics", lambda: fake)
    recorder = ScoreStageRecorder("r")
    recorder.record_batch(["ok"] * 10, started=100.0, ended=102.0)  # the first batch: set at once, 5 rows/s
    recorder.record_batch(["ok"] * 30, started=103.0, ended=108.0)  # 6 s into the window: not yet
    recorder.record_batch(["ok"] * 40, started=108.0, ended=112.0)  # 10 s: 70 rows over 10 s
    assert recorded == [5.0, 7.0]


def test_tokens_per_second_counts_from_the_previous_log(monkeypatch):
    recorded: dict[str, list[float]] = {"step": [], "loss": [], "tokens_per_second": []}

    class FakeGauge:
        def __init__(self, name):
            self.name = name

        def set(self, value, tags=None):
            recorded[self.name].append(value)

    from sentiment_ray.ops import metrics

    fake = metrics.FinetuneMetrics(FakeGauge("step"), FakeGauge("loss"), FakeGauge("tokens_per_second"))
    monkeypatch.setattr(metrics, "finetune_metrics", lambda: fake)
    recorder = FinetuneRecorder("r")
    recorder.start(tokens_seen=1000, now=10.0)  # resumed: its checkpoint had seen 1000 tokens
    recorder.record_log(step=12, loss=0.7, tokens_seen=1600, now=12.0)
    recorder.record_log(step=12, loss=None, tokens_seen=1600, now=13.0)  # the end-of-training summary log
    assert recorded == {"step": [12, 12], "loss": [0.7], "tokens_per_second": [300.0]}
