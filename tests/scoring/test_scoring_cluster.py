"""Scoring on a two-node Ray cluster (ray.cluster_utils.Cluster, on this machine): the scoring actor asks for a
custom resource that only the worker node has, so it runs there and nowhere else; then that node is killed
mid-run and a new one with the same resources joins, and the job still gives every row once, with the scores
of the uninterrupted run. The tokenizing stage is a pool of one actor, which may be on the killed node too.
(Two scoring actors, one on each of two nodes, one of them lost: tests/scoring/test_scoring_node_loss.py.)

The cluster runs in a subprocess (this file, run as `python -m tests.scoring.test_scoring_cluster <scenario.json>`): it
keeps its Ray apart from the session's private Ray (`ray_session`) and from other runs on the machine (its own
RAY_TMPDIR), and whatever it starts dies with its process group.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT, assert_same_rows, run_cluster_scenario

pytestmark = pytest.mark.timeout(900)
FILES, ROWS_PER_FILE, ROW_GROUP = 4, 1000, 100
ROWS_IN = FILES * ROWS_PER_FILE
UNITS = ROWS_IN // 200  # units of <= 256 rows gathered from row groups of 100: 200 rows each
HEAD = {"num_cpus": 2}  # no "scorer": a scoring actor cannot be placed on the head
# Room for the scoring actor and one more CPU: the tokenizing actor or read/write tasks may land there too (and die
# with it), as on a real cluster.
WORKER = {"num_cpus": 2, "resources": {"scorer": 1}}
FRAGMENTS_BEFORE_KILL = 4
RECORDS_ENV = "SENTIMENT_RAY_TEST_ACTOR_NODES"  # where each scoring actor incarnation records its node


# ------------------------------------------------------------------------------------------ the subprocess


def _score_config(scenario: dict, output: str, address: str):
    from sentiment_ray.config import ScoreConfig, load_config

    return load_config(ScoreConfig, REPO_ROOT / "configs" / "score" / "tiny_test.yaml", [
        f"adapter={scenario['adapter']}", f"input={scenario['input']}", f"output={output}", "model.dtype=float32",
        "unit_rows=200", "pool_size=1", "num_cpus_per_actor=1", "actor_resources={scorer: 1}", "prepare_actors=1",
        "num_cpus_per_prepare_actor=0.5", f"ray.address={json.dumps(address)}"])


def _record_scoring_actor_nodes() -> None:
    """Every scoring actor (each incarnation: a restarted actor runs __init__ again) records the node it runs on."""
    from sentiment_ray.scoring import job
    from sentiment_ray.scoring.stages import ScoreStage

    class NodeRecordingScoreStage(ScoreStage):  # defined in __main__: shipped to the actors by value
        def __init__(self, *args, **kwargs):
            import ray

            record = Path(os.environ[RECORDS_ENV]) / f"{os.getpid()}-{time.time_ns()}.json"
            record.write_text(json.dumps({"node": ray.get_runtime_context().get_node_id(), "at": time.time()}))
            super().__init__(*args, **kwargs)

    job.ScoreStage = NodeRecordingScoreStage


def _run_in_thread(target) -> tuple[threading.Thread, dict]:
    """`target()` in a thread; its value (or exception) in the dict once the thread ended."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = target()
        except BaseException:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = traceback.format_exc()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _kill_worker_when_fragments_exist(cluster, worker, output: Path, scoring: threading.Thread) -> dict:
    """On the main thread (Ray registers signal handlers when it starts a node): once a few fragments are written,
    every process of the worker node is killed; a while later a node with the same resources joins."""
    deadline = time.time() + 300
    while len(list(output.glob("part-*.parquet"))) < FRAGMENTS_BEFORE_KILL:
        if time.time() > deadline or not scoring.is_alive():
            return {"error": "the run ended, or wrote no fragments within 300 s, before the node could be killed"}
        time.sleep(0.05)
    kill = {"fragments_at_kill": len(list(output.glob("part-*.parquet"))), "killed_at": time.time()}
    cluster.remove_node(worker, allow_graceful=False)
    time.sleep(5)  # the node is gone for a while: the scoring actor cannot be placed anywhere meanwhile
    kill["replacement_node"] = cluster.add_node(**WORKER).node_id
    return kill


def run_scenario(scenario: dict) -> dict:
    """(a) an uninterrupted run, (b) a run whose worker node is killed mid-run; returns what the test checks."""
    import ray
    from ray.cluster_utils import Cluster

    from sentiment_ray.scoring import run_scoring

    _record_scoring_actor_nodes()
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "include_dashboard": False})
    try:
        worker = cluster.add_node(**WORKER)
        ray.init(address=cluster.address, log_to_driver=True)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        result = {"head": cluster.head_node.node_id, "worker": worker.node_id, "resources": nodes}

        records = Path(os.environ[RECORDS_ENV])
        started = time.time()
        result["uninterrupted"] = run_scoring(_score_config(scenario, scenario["uninterrupted"],
                                                            cluster.address)).to_dict()
        result["uninterrupted_seconds"] = time.time() - started
        result["uninterrupted_actors"] = [json.loads(p.read_text()) for p in sorted(records.iterdir())]
        for record in records.iterdir():
            record.unlink()

        started = time.time()
        scoring, outcome = _run_in_thread(
            lambda: run_scoring(_score_config(scenario, scenario["killed"], cluster.address)).to_dict())
        result["kill"] = _kill_worker_when_fragments_exist(cluster, worker, Path(scenario["killed"]), scoring)
        scoring.join(timeout=600)
        if scoring.is_alive() or "error" in outcome:
            raise RuntimeError(f"the run whose worker node was killed did not finish: {outcome.get('error')}")
        result["killed_run"] = outcome["value"]
        result["killed_run_seconds"] = time.time() - started
        result["killed_run_actors"] = [json.loads(p.read_text()) for p in sorted(records.iterdir())]
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def cluster_runs(random_adapter, tmp_path_factory) -> tuple[dict, Path]:
    from sentiment_ray.model.tiny import synthetic_reviews

    work = tmp_path_factory.mktemp("cluster")
    inputs = work / "reviews"
    inputs.mkdir()
    texts, _ = synthetic_reviews(ROWS_IN, seed=21)
    for part in range(FILES):
        rows = slice(part * ROWS_PER_FILE, (part + 1) * ROWS_PER_FILE)
        pq.write_table(pa.table({"id": [f"c{i}" for i in range(rows.start, rows.stop)], "text": texts[rows]}),
                       inputs / f"part-{part}.parquet", row_group_size=ROW_GROUP)
    records = work / "actor-nodes"
    records.mkdir()
    scenario = {"adapter": str(random_adapter), "input": str(inputs), "uninterrupted": str(work / "uninterrupted"),
                "killed": str(work / "killed"), "result": str(work / "result.json")}
    return run_cluster_scenario("tests.scoring.test_scoring_cluster", scenario, work, {RECORDS_ENV: str(records)},
                                timeout_s=780), work


def _scores(output: Path) -> dict:
    table = pq.read_table(output, columns=["id", "score", "status"])
    ids = table.column("id").to_pylist()
    assert len(ids) == ROWS_IN and len(set(ids)) == ROWS_IN  # rows out == rows in, no id twice
    assert set(table.column("status").to_pylist()) == {"ok"}
    return dict(zip(ids, table.column("score").to_pylist()))


def test_scoring_actors_run_on_the_worker_node_that_has_their_resource(cluster_runs):
    result, work = cluster_runs
    head, worker = result["head"], result["worker"]
    assert "scorer" not in result["resources"][head] and result["resources"][worker]["scorer"] == 1.0
    summary = result["uninterrupted"]
    assert (summary["rows_in"], summary["rows_out"], summary["rows_scored"]) == (ROWS_IN, ROWS_IN, ROWS_IN)
    assert summary["units"]["total"] == UNITS
    assert [a["node"] for a in result["uninterrupted_actors"]] == [worker]  # one actor, never restarted
    _scores(work / "uninterrupted")


def test_the_worker_node_killed_mid_run_the_job_completes_with_every_row_once(cluster_runs):
    result, work = cluster_runs
    kill, summary = result["kill"], result["killed_run"]
    assert "error" not in kill and FRAGMENTS_BEFORE_KILL <= kill["fragments_at_kill"] < UNITS  # killed mid-run
    before = [a for a in result["killed_run_actors"] if a["at"] < kill["killed_at"]]
    after = [a for a in result["killed_run_actors"] if a["at"] >= kill["killed_at"]]
    assert [a["node"] for a in before] == [result["worker"]]
    assert after and {a["node"] for a in after} == {kill["replacement_node"]}  # placed again, on the new node
    assert (summary["rows_in"], summary["rows_out"], summary["rows_scored"]) == (ROWS_IN, ROWS_IN, ROWS_IN)
    assert_same_rows(_scores(work / "killed"), _scores(work / "uninterrupted"))
    # what the retried work wrote twice was cleaned up at the commit: one fragment per piece of the tiling
    assert len(list((work / "killed").glob("part-*.parquet"))) == summary["units"]["fragments"]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["result"]).write_text(json.dumps(run_scenario(spec), default=str))
