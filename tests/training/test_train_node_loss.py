"""Finetuning on a two-node Ray cluster (ray.cluster_utils.Cluster, on this machine) that loses the node of one of
its two workers mid-run and gets **no** replacement (issue 28): each node has one `trainer` and each worker asks
for one (ray.resources_per_worker), so the group cannot be placed again on the head alone. Ray Train 2.60 would
retry that without end; the run stops within ray.wait_for_resources_s with one line naming the workers and the
resource (sentiment_ray/training/worker_room.py), and once a node with a `trainer` joins, a rerun under the same
ray.run_name continues from the run's last checkpoint and ends with the planned steps.

Like tests/scoring/test_scoring_node_loss.py, the cluster runs in a subprocess (this file as `python -m
tests.training.test_train_node_loss <scenario.json>`) with its own RAY_TMPDIR, whatever it starts dying with its
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

import pytest

from tests.conftest import REPO_ROOT, run_cluster_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
PLANNED_STEPS = 9  # 130 rows, global batch 16 (2 workers x 8), one epoch: as tests/training/test_train_distributed.py
CHECKPOINT_STEPS = 3
SLOW_STEP_S = 1.0  # the run outlasts the node's removal and its detection
WAIT_FOR_RESOURCES_S = 4
HEAD = {"num_cpus": 2, "resources": {"trainer": 1}}
WORKER = {"num_cpus": 2, "resources": {"trainer": 1}}
RUN_NAME = "lost-node"
# The surviving worker fails as soon as its peer's node is gone (gloo), and Ray Train places the group again before
# the GCS has marked the node dead, so worker_room.py's check still counts it and that placement waits out Ray
# Train's timeout (60 s by default) before the check sees the loss. 15 s here: the placements that should succeed
# are immediate (both nodes have their `trainer` free at the start; the new node has joined before the rerun).
PLACEMENT_TIMEOUT_S = 15


# ------------------------------------------------------------------------------------------ the subprocess


def _config(scenario: dict, address: str):
    from sentiment_ray.config import FinetuneConfig, load_config

    return load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={scenario['model']}", f"data.train={scenario['train']}",
        f"output_dir={scenario['output']}", "data.limit=130", "train.epochs=1", "train.batch_size=8",
        f"train.checkpoint_steps={CHECKPOINT_STEPS}", "ray.num_workers=2", "ray.resources_per_worker={trainer: 1}",
        f"ray.storage_path={scenario['storage']}", f"ray.run_name={RUN_NAME}", "ray.max_failures=2",
        f"ray.wait_for_resources_s={WAIT_FOR_RESOURCES_S}", f"ray.address={json.dumps(address)}"])


def _checkpoints(storage: str) -> list[str]:
    """The trainer checkpoints Ray Train holds for the run: those its controller registered (in its snapshot), which
    is what a restart or a rerun gets; a folder in storage alone is not enough (its report may still be on its way
    to the controller)."""
    snapshot = Path(storage) / RUN_NAME / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (ValueError, KeyError):  # being written
        return []
    return sorted(r["checkpoint_dir_name"] for r in results if r["checkpoint_dir_name"].startswith("trainer-step-"))


def run_scenario(scenario: dict) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from sentiment_ray.ops.faults import SLOW_BATCH_SECONDS
    from sentiment_ray.training.job import run_finetune

    cluster = Cluster(initialize_head=True, head_node_args={**HEAD, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=True)
        worker = cluster.add_node(**WORKER)
        cfg = _config(scenario, cluster.address)
        os.environ[SLOW_BATCH_SECONDS] = str(SLOW_STEP_S)
        outcome: dict = {}

        def train():
            try:
                outcome["value"] = run_finetune(cfg)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome.update(error_type=type(exc).__name__, error=str(exc), traceback=traceback.format_exc(),
                               ended_at=time.time())

        started = time.time()
        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        deadline = time.time() + 180
        while not _checkpoints(scenario["storage"]):  # the checkpoint of step 3 is Ray Train's
            if time.time() > deadline or not thread.is_alive():
                return {"error": f"no checkpoint to kill the node after: {outcome.get('traceback')}"}
            time.sleep(0.1)
        result = {"checkpoints_at_kill": _checkpoints(scenario["storage"]), "killed_at": time.time()}
        cluster.remove_node(worker, allow_graceful=False)
        thread.join(timeout=200)
        if thread.is_alive():
            return {**result, "error": "the run did not end within 200 s of the node's removal"}
        result.update(stopped=outcome, first_run_s=time.time() - started,
                      adapter_before_rerun=Path(scenario["output"]).exists())
        del os.environ[SLOW_BATCH_SECONDS]
        cluster.add_node(**WORKER)  # a node with a `trainer` joins: the same command continues the run
        rerun = time.time()
        result["rerun"] = run_finetune(cfg)["metrics"]
        result["rerun_s"] = time.time() - rerun
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


# ------------------------------------------------------------------------------------------ the test


def test_a_worker_node_lost_for_good_stops_the_run_within_the_wait_and_a_rerun_continues_from_its_checkpoint(
        tiny_model_dir, synthetic_train_file, tmp_path):
    scenario = {"model": str(tiny_model_dir), "train": str(synthetic_train_file), "output": str(tmp_path / "adapter"),
                "storage": str(tmp_path / "ray-results"), "result": str(tmp_path / "result.json")}
    result = run_cluster_scenario("tests.training.test_train_node_loss", scenario, tmp_path,
                                  {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(PLACEMENT_TIMEOUT_S)}, timeout_s=380)
    assert "error" not in result, result.get("error")
    stopped = result["stopped"]
    assert stopped.get("error_type") == "ClusterTooSmallError", stopped.get("traceback")
    message = stopped["error"]
    assert "\n" not in message and message.startswith("2 training workers (ray.num_workers) need {'CPU': 1, "
                                                      "'trainer': 1} each and the 1 node(s) the cluster has after "
                                                      "losing 1 node(s) hold 1, short of 'trainer'; waited ")
    assert f"rerun with ray.run_name={RUN_NAME} and ray.storage_path=" in message
    assert int(re.search(r"waited (\d+) s", message).group(1)) >= WAIT_FOR_RESOURCES_S
    # Bounded: the loss is seen within seconds, then the wait, at most one placement that times out
    # (PLACEMENT_TIMEOUT_S) and Ray Train's wait for the torch process group's shutdown (30 s; 5 s in tests:
    # TEST_RAY_ENV); alone it stopped 11-16 s after the removal, beside the rest of the suite on 2 cores 40-113 s
    # (before the 5 s), 70 s with a 60 s placement timeout: the bound is there to tell "stops" from Ray Train's
    # endless retries, not to time the stop
    print(f"stopped {stopped['ended_at'] - result['killed_at']:.1f} s after the node's removal; first run "
          f"{result['first_run_s']:.1f} s, rerun {result['rerun_s']:.1f} s")
    assert stopped["ended_at"] - result["killed_at"] < WAIT_FOR_RESOURCES_S + PLACEMENT_TIMEOUT_S + 120
    assert result["adapter_before_rerun"] is False  # nothing under output_dir
    resumed = result["rerun"]
    checkpoint_steps = [int(name.rsplit("-", 1)[1]) for name in result["checkpoints_at_kill"]]
    assert resumed["resumed_from_step"] >= max(checkpoint_steps) >= CHECKPOINT_STEPS
    assert resumed["steps"] == PLANNED_STEPS and resumed["num_workers"] == 2


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["result"]).write_text(json.dumps(run_scenario(spec), default=str))
