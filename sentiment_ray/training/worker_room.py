"""Training workers the cluster can no longer hold: a bounded wait, then one line, resumable (issue 28).

A finetune run has a fixed number of workers (`ray.num_workers`). When a node holding one is lost, Ray Train
restarts the whole group from the run's latest checkpoint (FailureConfig(max_failures); job.py logs it), on any
nodes with room. Where the nodes left cannot hold `ray.num_workers` workers and no node joins, Ray Train 2.60 waits
with no end: the group's placement group times out after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), which
counts as a controller failure, and those are retried without limit (FailureConfig.controller_failure_limit=-1).

So the run's scaling policy (Ray Train's fixed one, with this check; handed to the controller as job.py hands it
its failure policy) looks at the alive nodes' total resources before it starts a group. Where they hold it, the
group starts as before. Where they do not, it waits for a node to join (an autoscaler's or a replacement; the
group's resource request still goes to the autoscaler), at most `ray.wait_for_resources_s`, and then ends the run
with ClusterTooSmallError: one line naming the workers, the resource they are short of, and the rerun that
continues from the last checkpoint. The same check holds at the run's start, for a cluster that never held the group.

Why not shrink the group: Ray Train 2.60 has elastic groups (`ScalingConfig(num_workers=(min, max))`), but this
job's recipe is fixed per number of workers: each worker reads its own share of the rows (training/data.py,
datasets `train_rank<r>` with equal shares), the global batch is train.batch_size x workers, and the run's
identity records ray.num_workers, so that a rerun with other workers is refused. A group shrunk mid-run would
train another adapter than the one asked for, and could not be resumed as the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sentiment_ray.ops.ray_cluster import ClusterTooSmallError, alive_nodes, amounts, how_many_fit

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often the controller looks at the nodes while it waits (one small RPC to the GCS)


@dataclass(frozen=True)
class WorkerGroupRequest:
    """A training worker group: how many workers, and what each asks Ray for."""

    workers: int
    resources: dict[str, float]  # per worker: CPU, GPU, custom

    def capacity(self, nodes: list[dict]) -> int:
        """How many of these workers the nodes' total resources hold."""
        return sum(how_many_fit(self.resources, node) for node in nodes)

    def fits(self, nodes: list[dict]) -> bool:
        return self.capacity(nodes) >= self.workers

    def short_of(self, nodes: list[dict]) -> list[str]:
        """The resources the nodes hold too little of for the group (all it asks for where each alone would do but
        not together on the same nodes)."""
        wanted = {name: amount for name, amount in self.resources.items() if amount and amount > 0}
        short = [name for name, amount in wanted.items()
                 if sum(how_many_fit({name: amount}, node) for node in nodes) < self.workers]
        return short or sorted(wanted)


def too_small(request: WorkerGroupRequest, nodes: list[dict], lost: int, waited: float, rerun: str) -> str:
    """The line a run ends with when the nodes cannot hold its workers after the wait."""
    after = f" after losing {lost} node(s)" if lost else ""
    return (f"{request.workers} training workers (ray.num_workers) need {amounts(request.resources)} each and the "
            f"{len(nodes)} node(s) the cluster has{after} hold {request.capacity(nodes)}, short of "
            f"{' and '.join(repr(name) for name in request.short_of(nodes))}; waited {waited:.0f} s "
            f"(ray.wait_for_resources_s) for a node to join; {rerun}")


def waiting_scaling_policy(scaling_config, wait_s: float, rerun: str, clock=time.monotonic, poll_s: float = POLL_S):
    """Ray Train's fixed scaling policy, which starts a worker group only once the alive nodes can hold it, waits at
    most `wait_s` seconds for that, and then raises ClusterTooSmallError (its line ends with `rerun`). A private
    hook of Ray Train (the controller's `scaling_policy`), like job.user_errors_not_retried."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, NoopDecision

    class WaitForRoom(FixedScalingPolicy):
        def __init__(self, config):
            super().__init__(config)
            self.waiting_since: float | None = None
            self.nodes_of_last_start: set[str] = set()

        def make_decision_for_non_running_worker_group(self):
            decision = super().make_decision_for_non_running_worker_group()  # also asks the autoscaler for room
            nodes = alive_nodes()
            request = WorkerGroupRequest(decision.num_workers, dict(decision.resources_per_worker))
            lost = len(self.nodes_of_last_start - set(nodes))
            if request.fits(list(nodes.values())):
                if self.waiting_since is not None:
                    logger.warning("the cluster holds the %d training workers again; Ray Train starts them",
                                   request.workers)
                self.waiting_since, self.nodes_of_last_start = None, set(nodes)
                return decision
            now = clock()
            if self.waiting_since is None:
                self.waiting_since = now
                # A warning: this runs in Ray Train's controller actor, whose stderr reaches the driver's log.
                logger.warning("%d training workers need %s each and the %d node(s) the cluster has%s hold %d; "
                               "waiting up to %.0f s (ray.wait_for_resources_s) for a node to join",
                               request.workers, amounts(request.resources), len(nodes),
                               f" after losing {lost} node(s)" if lost else "", request.capacity(list(nodes.values())),
                               wait_s)
            elif now - self.waiting_since >= wait_s:
                raise ClusterTooSmallError(too_small(request, list(nodes.values()), lost, now - self.waiting_since,
                                                     rerun))
            time.sleep(poll_s)  # the controller asks again at once: not a busy loop on the GCS
            return NoopDecision()

    return WaitForRoom(scaling_config)


def cluster_too_small_inside(error: BaseException) -> ClusterTooSmallError | None:
    """The ClusterTooSmallError that ended a run, out of Ray Train's ControllerError."""
    failure = getattr(error, "controller_failure", None)
    return failure if isinstance(failure, ClusterTooSmallError) else None
