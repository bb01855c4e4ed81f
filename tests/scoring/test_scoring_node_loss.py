"""Scoring on a two-node Ray cluster (ray.cluster_utils.Cluster, on this machine) that loses its worker node
mid-run and gets **no** replacement (issue 28):

- where the head can hold one actor of each stage, the pipeline re-forms there and every row comes out once, to
  a local folder and to S3 (moto): each node has one `scorer`, so the pool of two scoring actors has one on the
  worker; the one that died with it could only restart where the head's actor holds the `scorer`, which is where
  Ray Data's pools used to wait forever;
- where the scoring stage needs a resource only the lost node had (`accelerator`, as a GPU), the job stops within
  ray.wait_for_resources_s with one line naming the stage and the resource, and `--resume` on a node that has it
  finishes the output exactly once.

Like tests/scoring/test_scoring_cluster.py, the cluster runs in a subprocess (this file as `python -m
tests.scoring.test_scoring_node_loss <scenario.json>`), with its own RAY_TMPDIR, whatever it starts dying with its
process group.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT, assert_same_rows, run_cluster_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
FILES, ROWS_PER_FILE, ROW_GROUP = 2, 480, 96
ROWS_IN = FILES * ROWS_PER_FILE
UNIT_ROWS, BATCH = 96, 32  # 10 units, 30 batches
SLOW_BATCH_S = 0.4  # the run outlasts the node's removal and its detection
WAIT_FOR_RESOURCES_S = 4
FRAGMENTS_BEFORE_KILL = 2
HEAD = {"num_cpus": 2, "resources": {"scorer": 1}}
WORKER = {"num_cpus": 2, "resources": {"scorer": 1}}
ACCELERATOR_WORKER = {"num_cpus": 2, "resources": {"accelerator": 1}}
RECORDS_ENV = "SENTIMENT_RAY_TEST_ACTOR_NODES"


# ------------------------------------------------------------------------------------------ the subprocess


def _config(scenario: dict, output: str, address: str, *extra: str):
    from sentiment_ray.config import ScoreConfig, load_config

    return load_config(ScoreConfig, REPO_ROOT / "configs" / "score" / "tiny_test.yaml", [
        f"adapter={scenario['adapter']}", f"input={scenario['input']}", f"output={output}", "model.dtype=float32",
        # tokenizing in tasks, as the tiny config does (tests/scoring/test_scoring_cluster.py runs a tokenizing
        # actor pool through a lost node)
        f"unit_rows={UNIT_ROWS}", f"batch_size={BATCH}", "num_cpus_per_actor=1", "prepare_actors=0",
        "num_cpus_per_prepare_actor=0.5", f"ray.address={json.dumps(address)}",
        f"ray.wait_for_resources_s={WAIT_FOR_RESOURCES_S}", *extra])


def _record_scoring_actor_nodes() -> None:
    """Every scoring actor (each incarnation, each pipeline) records the node it runs on."""
    from sentiment_ray.scoring import job
    from sentiment_ray.scoring.stages import ScoreStage

    class NodeRecordingScoreStage(ScoreStage):  # defined in __main__: shipped to the actors by value
        def __init__(self, *args, **kwargs):
            import ray

            record = Path(os.environ[RECORDS_ENV]) / f"{os.getpid()}-{time.time_ns()}.json"
            record.write_text(json.dumps({"node": ray.get_runtime_context().get_node_id(), "at": time.time()}))
            super().__init__(*args, **kwargs)

    job.ScoreStage = NodeRecordingScoreStage


def _actor_records() -> list[dict]:
    folder = Path(os.environ[RECORDS_ENV])
    records = [json.loads(p.read_text()) for p in sorted(folder.iterdir())]
    for path in folder.iterdir():
        path.unlink()
    return records


def _fragments(output: str) -> int:
    from sentiment_ray.io.storage import location

    folder = location(output)
    try:
        return sum(c.name.startswith("part-") for c in folder.children())
    except (FileNotFoundError, OSError):
        return 0


def _finished(output: str) -> bool:
    from sentiment_ray.io.storage import location
    from sentiment_ray.scoring.output import MANIFEST_FILE

    return location(output).join(MANIFEST_FILE).is_file()


def _in_thread(target) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome.update(error_type=type(exc).__name__, error=str(exc), traceback=traceback.format_exc(),
                           ended_at=time.time())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _run_and_remove(cluster, node, cfg) -> dict:
    """`cfg` scored in a thread; on the main thread (Ray's signal handlers), `node` removed for good once a few
    fragments are written. What the test checks."""
    from sentiment_ray.scoring import run_scoring

    started = time.time()
    scoring, outcome = _in_thread(lambda: run_scoring(cfg).to_dict())
    deadline = time.time() + 240
    while _fragments(cfg.output) < FRAGMENTS_BEFORE_KILL:
        if time.time() > deadline or not scoring.is_alive():
            return {"error": f"no fragments to kill the node after: {outcome.get('traceback')}"}
        time.sleep(0.05)
    result = {"fragments_at_kill": _fragments(cfg.output), "killed_at": time.time(), "removed": node.node_id}
    cluster.remove_node(node, allow_graceful=False)
    scoring.join(timeout=300)
    if scoring.is_alive():
        return {**result, "error": "the run did not end within 300 s of the node's removal"}
    result.update(outcome, seconds=time.time() - started, actors=_actor_records())
    return result


def run_scenario(scenario: dict) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from sentiment_ray.ops.faults import SLOW_BATCH_SECONDS
    from sentiment_ray.scoring import run_scoring

    os.environ[SLOW_BATCH_SECONDS] = str(SLOW_BATCH_S)
    _record_scoring_actor_nodes()
    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=True)
        result = {"head": cluster.head_node.node_id}
        for name in ("local", "s3"):
            worker = cluster.add_node(**WORKER)
            result[name] = _run_and_remove(cluster, worker, _config(scenario, scenario[name], cluster.address,
                                                                    "pool_size=2", "actor_resources={scorer: 1}"))
        accelerator = cluster.add_node(**ACCELERATOR_WORKER)
        gpu_like = ["pool_size=1", "actor_resources={accelerator: 1}"]
        result["stranded"] = _run_and_remove(cluster, accelerator,
                                             _config(scenario, scenario["stranded"], cluster.address, *gpu_like))
        result["stranded"]["manifest_before_resume"] = _finished(scenario["stranded"])
        result["stranded"]["new_node"] = cluster.add_node(**ACCELERATOR_WORKER).node_id
        resumed = run_scoring(_config(scenario, scenario["stranded"], cluster.address, *gpu_like, "resume=true"))
        result["resumed"] = {**resumed.to_dict(), "actors": _actor_records()}
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def node_loss_runs(random_adapter, s3_server, tmp_path_factory) -> tuple[dict, Path]:
    import uuid

    from sentiment_ray.model.tiny import synthetic_reviews

    work = tmp_path_factory.mktemp("node-loss")
    inputs = work / "reviews"
    inputs.mkdir()
    texts, _ = synthetic_reviews(ROWS_IN, seed=28)
    for part in range(FILES):
        rows = slice(part * ROWS_PER_FILE, (part + 1) * ROWS_PER_FILE)
        pq.write_table(pa.table({"id": [f"n{i}" for i in range(rows.start, rows.stop)], "text": texts[rows]}),
                       inputs / f"part-{part}.parquet", row_group_size=ROW_GROUP)
    (work / "actor-nodes").mkdir()
    bucket = s3_server.create_bucket(f"sr-node-loss-{uuid.uuid4().hex[:8]}")
    scenario = {"adapter": str(random_adapter), "input": str(inputs), "local": str(work / "local"),
                "s3": f"{bucket}/scored", "stranded": str(work / "stranded"), "result": str(work / "result.json")}
    # the environment passed on holds the AWS_* variables of s3_server
    return run_cluster_scenario("tests.scoring.test_scoring_node_loss", scenario, work,
                                {RECORDS_ENV: str(work / "actor-nodes")}, timeout_s=540), scenario


def _rows(output: str) -> dict:
    """id -> score of a finished output; asserts rows out == rows in, no id twice, every row scored."""
    import pyarrow.dataset as pads

    from sentiment_ray.io.storage import location

    folder = location(output)
    manifest = json.loads(folder.join("_sentiment_ray_manifest.json").read_text())
    parts = [c.name for c in folder.children() if c.name.startswith("part-")]
    # no fragment that a write of a stopped pipeline published besides those the commit chose
    assert sorted(parts) == sorted(f for f in manifest["files_written"] if f.startswith("part-"))
    table = pads.dataset([folder.join(p).path for p in parts], filesystem=folder.filesystem,
                         format="parquet").to_table(columns=["id", "score", "status"])
    ids = table.column("id").to_pylist()
    assert len(ids) == ROWS_IN and len(set(ids)) == ROWS_IN
    assert set(table.column("status").to_pylist()) == {"ok"}
    return dict(zip(ids, table.column("score").to_pylist()))


def _assert_reformed_on_the_head(run: dict, head: str) -> None:
    assert "error" not in run, run.get("traceback") or run.get("error")
    assert FRAGMENTS_BEFORE_KILL <= run["fragments_at_kill"] < ROWS_IN // UNIT_ROWS  # removed mid-run
    before = [a["node"] for a in run["actors"] if a["at"] < run["killed_at"]]
    after = [a["node"] for a in run["actors"] if a["at"] >= run["killed_at"]]
    assert sorted(before) == sorted([head, run["removed"]])  # one scoring actor on each node
    assert after and set(after) == {head}  # the pipeline re-formed on the head, the only node left
    summary = run["value"]
    assert (summary["rows_in"], summary["rows_out"], summary["rows_scored"]) == (ROWS_IN, ROWS_IN, ROWS_IN)


def test_a_node_lost_for_good_mid_run_the_pipeline_reforms_on_the_head_and_every_row_is_written_once(
        node_loss_runs):
    result, scenario = node_loss_runs
    _assert_reformed_on_the_head(result["local"], result["head"])
    _rows(scenario["local"])
    # what the stopped pipeline wrote twice was cleaned up at the commit: one fragment per piece of the tiling
    assert len(list(Path(scenario["local"]).glob("part-*.parquet"))) == result["local"]["value"]["units"]["fragments"]


def test_the_same_on_s3_output(node_loss_runs):
    result, scenario = node_loss_runs
    _assert_reformed_on_the_head(result["s3"], result["head"])
    assert_same_rows(_rows(scenario["s3"]), _rows(scenario["local"]))


def test_a_stage_no_node_left_can_hold_stops_within_the_wait_with_one_line_and_resume_finishes(node_loss_runs):
    result, scenario = node_loss_runs
    stranded, resumed = result["stranded"], result["resumed"]
    assert stranded.get("error_type") == "ClusterTooSmallError", stranded.get("traceback")
    message = stranded["error"]
    assert "\n" not in message and "stage ScoreStage" in message and "'accelerator'" in message
    assert "--resume" in message and int(re.search(r"waited (\d+) s", message).group(1)) >= WAIT_FOR_RESOURCES_S
    # Bounded: the node's death is seen within seconds, then the wait; never an endless wait.
    assert stranded["ended_at"] - stranded["killed_at"] < WAIT_FOR_RESOURCES_S + 30
    assert stranded["manifest_before_resume"] is False  # unfinished, resumable
    assert 0 < resumed["rows_scored_this_run"] < ROWS_IN  # only what the stopped run had not committed
    assert {a["node"] for a in resumed["actors"]} == {stranded["new_node"]}
    assert (resumed["rows_in"], resumed["rows_out"], resumed["rows_scored"]) == (ROWS_IN, ROWS_IN, ROWS_IN)
    assert_same_rows(_rows(scenario["stranded"]), _rows(scenario["local"]))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["result"]).write_text(json.dumps(run_scenario(spec), default=str))
