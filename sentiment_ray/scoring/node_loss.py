"""Scoring through the loss of a node: stop the pipeline, re-form it on what is left, or stop with one line.

Why the pipeline is stopped rather than left to Ray: Ray Data's actor pools restart a dead actor
(`max_restarts=-1`) and queue its batches on it again (`max_task_retries=-1`). An actor of a lost node can only
restart where its resources are free, and nothing frees them: Ray Data 2.60 shrinks a pool only by pending or
idle actors (`_ActorPool._remove_inactive_actor`), and a restarting actor holds batches, so the tokenizing
actors sized for the cluster the job saw at its start keep their CPUs and the scoring actor waits forever (issue
28: "Cluster resources are not enough to run any task from ActorPoolMapOperator[MapBatches(ScoreStage)]").

So while a pipeline runs, a Ray Data execution callback compares the alive nodes with those the pipeline started
on (once a second, on the executor's own loop) and raises `NodeLost` there, which ends the execution like any
operator error. The stopped pipeline's actors (both pools) and write tasks are killed and waited for
(`end_pipeline`), so that no write of it publishes a fragment later and no actor of it scores batches that no write
takes any more, holding the resources the next pipeline needs. The driver then waits, at most
`ray.wait_for_resources_s`, until one actor of each stage fits a node that is alive, and starts a new pipeline sized
for those nodes on the rows that no committed fragment holds (the in-process equivalent of `--resume`;
sentiment_ray/scoring/job.py). Where no node can hold a stage by the end of the wait, the job stops with
`ClusterTooSmallError`: one line naming the stage and the resource, the output unfinished and resumable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sentiment_ray.io.errors import causes
from sentiment_ray.ops.ray_cluster import ClusterTooSmallError, ResourceRequest, alive_nodes, amounts, how_many_fit

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # how often the executor's loop asks the GCS for the nodes (one small RPC)


class NodeLost(RuntimeError):
    """A node the running pipeline started on is gone: the pipeline stops, to re-form on the nodes left."""

    def __init__(self, nodes: list[str]):
        super().__init__(f"lost {len(nodes)} node(s) of the pipeline: {', '.join(n[:12] for n in nodes)}")
        self.nodes = nodes


@dataclass(frozen=True)
class StageRequest:
    """One actor of a pipeline stage and the resources it asks Ray for."""

    stage: str  # the stage's class, as Ray Data names its operator: ScoreStage, PrepareStage
    resources: dict[str, float]

    @classmethod
    def of(cls, stage: str, request: ResourceRequest) -> StageRequest:
        return cls(stage, {name: amount for name, amount in request.resources.items() if amount and amount > 0})

    def fits(self, node: dict) -> bool:
        return all(node.get(name, 0) >= amount for name, amount in self.resources.items())

    def actors_on(self, node: dict) -> int:
        """How many of these actors the node's total resources hold."""
        return how_many_fit(self.resources, node)

    def missing(self, nodes: list[dict]) -> list[str]:
        """The resources of the request that no node has enough of (all of them where each is somewhere but
        never all on one node)."""
        short = [name for name, amount in self.resources.items() if all(n.get(name, 0) < amount for n in nodes)]
        return short or sorted(self.resources)


def scoring_actors_that_fit(request: StageRequest, nodes: list[dict], wanted: int) -> int:
    """Scoring actors for a re-formed pipeline: as many as the nodes' total resources hold, at most `wanted`, at
    least one (the caller waited until one fits)."""
    return max(1, min(wanted, sum(request.actors_on(node) for node in nodes)))


@dataclass
class PipelineWatch:
    """One pipeline's nodes at its start, and its write tasks and actors as of the executor's last step (Ray Data
    forgets them when it stops a failed execution, and they must be ended before the driver reads the output or
    starts the next pipeline)."""

    nodes_at_start: set[str]
    write_tasks: list = field(default_factory=list)  # Ray Data OpTasks of the write operator
    actors: list = field(default_factory=list)  # ActorHandles of the pipeline's actor pools (tokenizing, scoring)


_WATCHES: dict[str, PipelineWatch] = {}  # the driver's pipelines running now, by the key in their DataContext
WATCH_KEY = "sentiment_ray.pipeline_watch"


def watch_of(data_context) -> PipelineWatch | None:
    """The watch of the pipeline that runs with this DataContext; None for any other dataset."""
    return _WATCHES.get(data_context.get_config(WATCH_KEY))


def check_nodes(watch: PipelineWatch) -> None:
    """Raise NodeLost where a node the pipeline started on is no longer alive."""
    try:
        alive = set(alive_nodes())
    except Exception:  # noqa: BLE001 - the GCS busy or slow: asked again at a later step
        logger.debug("could not list the cluster's nodes", exc_info=True)
        return
    gone = watch.nodes_at_start - alive
    if gone:
        raise NodeLost(sorted(gone))


def write_tasks_of(executor) -> list:
    """The write operator's tasks running or waiting now (the last operator of the scoring pipeline)."""
    try:
        return list(executor._output_node[0].get_active_tasks())  # noqa: SLF001 - Ray Data's handle on its sink
    except Exception:  # noqa: BLE001 - another Ray Data layout: nothing to end; the commit's check still holds
        logger.debug("could not list the pipeline's write tasks", exc_info=True)
        return []


def actors_of(executor) -> list:
    """The actors of the pipeline's actor pools (tokenizing and scoring) now: running, restarting or starting."""
    try:
        handles = []
        for operator in executor._topology:  # noqa: SLF001 - the running execution's operators
            for pool in operator.get_autoscaling_actor_pools():
                # the pool's own records, which its forced shutdown kills (_ActorPool._release_*_actors)
                handles += [*pool._running_actors, *pool._pending_actors.values()]  # noqa: SLF001
        return handles
    except Exception:  # noqa: BLE001 - another Ray Data layout: nothing to kill; the commit's check still holds
        logger.debug("could not list the pipeline's actors", exc_info=True)
        return []


def end_pipeline(watch: PipelineWatch, timeout_s: float = 60.0) -> None:
    """Kill the stopped pipeline's actors and write tasks and wait for them to end, before the driver reads the
    output and starts the next pipeline.

    Ray Data stops a failed execution without force: `_ClosingIterator.get_next` calls
    `executor.shutdown(force=False)` as the error passes, so the forced shutdown of `write_datasink`'s
    `with executor:` finds it done. Unforced, it cancels the write tasks without waiting (and Ray Core retries
    those lost with the node on its own): a write task of the stopped pipeline could otherwise publish a fragment
    after the next pipeline's commit check, into a finished output. And its actor pools only drop their handles: an
    actor whose handles are dropped runs what is queued on it before it exits, and the lost node's scoring actor,
    which Ray restarts elsewhere, ran its 98 queued batches (6,272 rows) there for nothing in the soak run of issue
    28, holding its `scorer` (on a GPU cluster, its GPU) while the new pipeline's actor waited for it. So this does
    what the forced shutdown does, with the handles recorded at the pipeline's last step: `ray.kill` of every actor
    of the pools (`_ActorPool.shutdown(force=True)`) and a forced cancel of the write tasks. Force-cancelled, a
    write task's process dies before its fragment's rename or upload, or after it: never half-way
    (storage.write_with)."""
    import ray

    actors, watch.actors = watch.actors, []
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)  # also one restarting after its node was lost
        except Exception:  # noqa: BLE001 - already dead
            logger.debug("could not kill an actor of the stopped pipeline", exc_info=True)
    refs = []
    for task in watch.write_tasks:
        try:
            task._cancel(force=True)  # noqa: SLF001 - as Ray Data's own forced shutdown does
        except Exception:  # noqa: BLE001 - already ended, or its worker already gone
            logger.debug("could not cancel a write task", exc_info=True)
        waitable = task.get_waitable()
        refs.append(getattr(waitable, "_generator_ref", waitable))  # a streaming generator's task ref
    watch.write_tasks = []
    # A call on a killed actor fails once Ray has it dead: these refs are ready when the actors are gone (and
    # their resources free for the next pipeline's actors).
    writes = len(refs)
    refs += [actor.__ray_ready__.remote() for actor in actors]
    if refs:
        _, left = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        logger.info("ended %d actor(s) (%s) and %d write task(s) of the stopped pipeline%s", len(actors),
                    ", ".join(_class_name(actor) for actor in actors), writes,
                    f"; {len(left)} did not end within {timeout_s:.0f} s" if left else "")


def _class_name(actor) -> str:
    """`MapWorker(MapBatches(ScoreStage))`: which pool an actor is of, for the log."""
    try:
        return actor._ray_actor_creation_function_descriptor.class_name  # noqa: SLF001
    except AttributeError:
        return "actor"


def lost_node_inside(exc: BaseException, nodes_at_start: set[str]) -> NodeLost | None:
    """The NodeLost that stopped the pipeline; or, for a pipeline that failed some other way (an object or an
    actor lost with its node) while a node it started on is gone, a NodeLost naming those nodes. None: the failure
    is not a lost node's, and is raised as it is."""
    found = next((current for current in causes(exc) if isinstance(current, NodeLost)), None)
    if found is not None:
        return found
    try:
        gone = nodes_at_start - set(alive_nodes())
    except Exception:  # noqa: BLE001 - Ray itself gone: the original error says more
        return None
    return NodeLost(sorted(gone)) if gone else None


def wait_for_room(requests: list[StageRequest], wait_s: float, lost: NodeLost, poll_s: float = 1.0,
                  clock=time.monotonic) -> dict[str, dict]:
    """Returns the alive nodes once each stage fits one of them; raises ClusterTooSmallError after `wait_s`
    seconds in which some stage fit none (an autoscaler may bring a node meanwhile)."""
    started = clock()
    announced = False
    while True:
        nodes = alive_nodes()
        homeless = next((r for r in requests if not any(r.fits(n) for n in nodes.values())), None)
        if homeless is None:
            return nodes
        waited = clock() - started
        if waited >= wait_s:
            raise ClusterTooSmallError(_too_small(homeless, list(nodes.values()), lost, waited))
        if not announced:
            logger.warning("stage %s needs %s per actor and none of the %d node(s) left after the loss of %s has "
                           "that; waiting up to %.0f s (ray.wait_for_resources_s) for the cluster to grow",
                           homeless.stage, amounts(homeless.resources), len(nodes),
                           ", ".join(n[:12] for n in lost.nodes), wait_s)
            announced = True
        time.sleep(poll_s)


def _too_small(request: StageRequest, nodes: list[dict], lost: NodeLost, waited: float) -> str:
    missing = request.missing(nodes)
    return (f"stage {request.stage} needs {amounts(request.resources)} per actor and no node the cluster has left "
            f"after losing {len(lost.nodes)} node(s) has {' and '.join(repr(m) for m in missing)} for it; waited "
            f"{waited:.0f} s (ray.wait_for_resources_s) for a node to join; the output is resumable with --resume")
