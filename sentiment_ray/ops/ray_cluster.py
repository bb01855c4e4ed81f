"""Connecting to Ray: the cluster a job was submitted to, a running local one, or a private one."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from sentiment_ray.config import ConfigError, RayConfig
from sentiment_ray.ops.signals import keep_sigterm_handler

logger = logging.getLogger(__name__)


def local_cpus() -> int:
    """Logical CPUs for a Ray this process starts: one more than the cores, so that actors reserving every
    core (a scoring pool, a training worker) never starve Ray Data's read and write tasks, which on a
    2-core machine would hang the job without an error."""
    return (os.cpu_count() or 1) + 1


@keep_sigterm_handler()  # ray.init replaces the CLI's SIGTERM handler (sentiment_ray/ops/signals.py)
def ensure_ray(cfg: RayConfig) -> None:
    """`address=None`: join RAY_ADDRESS or a running `ray start --head` cluster, else start Ray in-process;
    `address="local"`: always a private in-process Ray; anything else: that cluster."""
    import ray

    from sentiment_ray.ops.logging_setup import ray_data_errors_to_log_file

    ray_data_errors_to_log_file()  # the command reports a failed read in one line; Ray Data's log keeps the rest
    if ray.is_initialized():
        return
    if cfg.address not in (None, "local"):
        ray.init(address=cfg.address, log_to_driver=True)
        return
    if cfg.address is None:
        try:
            ray.init(address="auto", log_to_driver=True)
            return
        except ConnectionError:  # no cluster running: start our own below
            pass
    ray.init(address="local", num_cpus=cfg.num_cpus or local_cpus(), log_to_driver=True)


# ------------------------------------------------------------------------------------------ requests that fit


@dataclass(frozen=True)
class ResourceRequest:
    """What one actor or worker of a job asks Ray for, and the settings that ask it (named in a refusal)."""

    what: str  # "each scoring actor"
    resources: dict[str, float]  # Ray resource name -> amount (CPU, GPU, memory in bytes, custom)
    settings: dict[str, str]  # resource name -> the config key that sets it


class UnmeetableResourcesError(ConfigError):
    """A request that no node of the cluster can ever meet: the job would wait for it forever."""


class ClusterTooSmallError(RuntimeError):
    """After losing nodes mid-run, the nodes left cannot hold the job (an actor of a scoring stage, finetune's
    workers) and none joined within ray.wait_for_resources_s (exit 1: the cluster, not the user's input; the job's
    work so far stays resumable)."""


def alive_nodes() -> dict[str, dict]:
    """Node id -> total resources, of the nodes the GCS has alive now."""
    import ray

    return {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")}


def how_many_fit(resources: dict[str, float], node: dict) -> int:
    """How many actors or workers that each ask for `resources` a node's total resources hold (any number where
    they ask for nothing)."""
    wanted = {name: amount for name, amount in resources.items() if amount and amount > 0}
    if not wanted:
        return 1 << 30
    return min(math.floor(node.get(name, 0) / amount + 1e-9) for name, amount in wanted.items())


def amounts(resources: dict[str, float]) -> str:
    """`{'CPU': 1, 'GPU': 1}`, for a message."""
    return "{" + ", ".join(f"{name!r}: {amount:g}" for name, amount in resources.items()) + "}"


def check_requests_fit(requests: list[ResourceRequest], nodes: list[dict] | None = None,
                       may_add_nodes: bool | None = None) -> None:
    """Refuse (UnmeetableResourcesError, exit 2) a request that no alive node can meet, before any work starts:
    Ray would keep the actor pending and the job would wait with no end. Where an autoscaler might add a larger
    node, only warn. `nodes` (ray.nodes()) and `may_add_nodes` are looked up when not given."""
    import ray

    if nodes is None:
        nodes = ray.nodes()
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    for request in requests:
        wanted = {name: amount for name, amount in request.resources.items() if amount and amount > 0}
        if not wanted or any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in alive):
            continue
        short = next((k for k, v in wanted.items() if all(node.get(k, 0) < v for node in alive)), None)
        if short is not None:  # one resource that no node has enough of: the one setting to change
            largest = max(alive, key=lambda node: node.get(short, 0), default={})
            setting, asked = request.settings.get(short, short), _amount(short, wanted[short])
            message = (f"{setting}={asked}: {request.what} asks for {asked} {short}, but no node of the cluster has "
                       f"that much (the largest has {_amount(short, largest.get(short, 0))} {short}: "
                       f"{_describe_node(largest)}); lower {setting} or add a node that has it")
        else:  # each fits somewhere, never all on one node
            settings = ", ".join(f"{request.settings.get(k, k)}={_amount(k, v)}" for k, v in wanted.items())
            asked = " and ".join(f"{_amount(k, v)} {k}" for k, v in wanted.items())
            largest = {k: _describe_node(max(alive, key=lambda node, k=k: node.get(k, 0))) for k in wanted}
            message = (f"{settings}: {request.what} asks for {asked} on one node, but no node of the cluster has all "
                       "of that (the largest " + "; ".join(f"by {k}: {d}" for k, d in largest.items())
                       + "); lower one of these settings or add a node that has it")
        if may_add_nodes is None:
            may_add_nodes = _autoscaler_may_add_nodes()
        if may_add_nodes:
            logger.warning("%s; the job waits until the cluster's autoscaler adds such a node", message)
            continue
        raise UnmeetableResourcesError(message)


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / 2**30:.1f} GiB" if value else "0"
    return f"{value:g}"


def _describe_node(resources: dict) -> str:
    return ", ".join(f"{_amount(k, resources.get(k, 0))} {k}" for k in ("CPU", "GPU", "memory")) or "no resources"


def _autoscaler_may_add_nodes() -> bool:
    """Conservative: True unless Ray's autoscaler status shows only the read-only provider that a cluster of
    fixed nodes has (`ray start` by hand, a Ray this process started), whose node types are the nodes themselves
    (`node_<node id>`); a cluster launcher or KubeRay names its node types, and may add nodes of them."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # no status to go by: assume nodes may come
        return True
    nodes = [*status.active_nodes, *status.idle_nodes]
    if not nodes or status.pending_launches or status.pending_nodes:
        return True
    return not all(node.ray_node_type_name == f"node_{node.node_id}" for node in nodes)
