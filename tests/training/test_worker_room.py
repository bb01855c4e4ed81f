"""Training workers the cluster can no longer hold (sentiment_ray/training/worker_room.py), without a cluster: how
many workers the nodes hold, which resource they are short of, and the scaling policy that waits a bounded time
for room before Ray Train starts a group, then ends the run with one line. On a real two-node cluster:
tests/training/test_train_node_loss.py."""

from __future__ import annotations

import pytest

from sentiment_ray.ops.ray_cluster import ClusterTooSmallError
from sentiment_ray.training import worker_room
from sentiment_ray.training.worker_room import WorkerGroupRequest, cluster_too_small_inside, too_small

TWO = WorkerGroupRequest(2, {"CPU": 1.0, "trainer": 1.0})
RERUN = "rerun with ray.run_name=r to continue"


def test_the_nodes_hold_workers_by_their_totals_and_the_short_resource_is_named():
    head, worker = {"CPU": 2.0, "trainer": 1.0}, {"CPU": 2.0, "trainer": 1.0}
    assert TWO.capacity([head, worker]) == 2 and TWO.fits([head, worker])
    assert TWO.capacity([head]) == 1 and not TWO.fits([head])
    assert TWO.short_of([head]) == ["trainer"]
    assert TWO.short_of([{"CPU": 1.0, "trainer": 2.0}, {"CPU": 1.0}]) == ["CPU", "trainer"]  # never both on one
    assert WorkerGroupRequest(4, {"CPU": 1.0}).capacity([{"CPU": 2.5}, {"CPU": 1.0}]) == 3


def test_the_line_names_the_workers_the_resource_the_wait_and_the_rerun():
    assert too_small(TWO, [{"CPU": 2.0, "trainer": 1.0}], lost=1, waited=4.2, rerun=RERUN) == (
        "2 training workers (ray.num_workers) need {'CPU': 1, 'trainer': 1} each and the 1 node(s) the cluster has "
        "after losing 1 node(s) hold 1, short of 'trainer'; waited 4 s (ray.wait_for_resources_s) for a node to "
        "join; rerun with ray.run_name=r to continue")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _policy(monkeypatch, nodes: list[dict], wait_s: float = 5.0):
    """The policy for two workers of {CPU: 1, trainer: 1}, on the nodes `nodes[0]` (a list: the test changes it),
    asking no autoscaler."""
    from ray.train import ScalingConfig

    monkeypatch.setattr(worker_room, "alive_nodes", lambda: dict(nodes[0]))
    policy = worker_room.waiting_scaling_policy(
        ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "trainer": 1}), wait_s, RERUN, clock=_Clock(),
        poll_s=0)
    monkeypatch.setattr(policy, "_maybe_send_resource_request", lambda: None)
    return policy


def test_a_group_the_nodes_hold_starts_at_once_and_one_they_no_longer_hold_waits_then_stops(monkeypatch):
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    both = {"head": {"CPU": 2.0, "trainer": 1.0}, "worker": {"CPU": 2.0, "trainer": 1.0}}
    nodes = [both]
    policy = _policy(monkeypatch, nodes)
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2
    nodes[0] = {"head": both["head"]}  # the worker node is lost; the group failed and is to restart
    assert all(isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision) for _ in range(5))
    with pytest.raises(ClusterTooSmallError) as stopped:
        policy.make_decision_for_non_running_worker_group()
    assert str(stopped.value) == (
        "2 training workers (ray.num_workers) need {'CPU': 1, 'trainer': 1} each and the 1 node(s) the cluster has "
        "after losing 1 node(s) hold 1, short of 'trainer'; waited 5 s (ray.wait_for_resources_s) for a node to "
        "join; rerun with ray.run_name=r to continue")


def test_a_node_joining_during_the_wait_lets_the_group_start_there(monkeypatch):
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    head = {"CPU": 2.0, "trainer": 1.0}
    nodes = [{"head": head}]
    policy = _policy(monkeypatch, nodes, wait_s=60)
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)  # never held: waits too
    nodes[0] = {"head": head, "new": {"CPU": 4.0, "trainer": 1.0}}
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)


def test_the_line_is_found_inside_ray_trains_controller_error():
    from ray.train.v2.api.exceptions import ControllerError

    line = ClusterTooSmallError("2 training workers ...")
    assert cluster_too_small_inside(ControllerError(line)) is line
    assert cluster_too_small_inside(ControllerError(RuntimeError("other"))) is None
    assert cluster_too_small_inside(RuntimeError("not Ray Train's")) is None
