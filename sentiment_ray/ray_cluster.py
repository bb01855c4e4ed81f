"""Connecting to Ray: the cluster a job was submitted to, a running local one, or a private one."""

from __future__ import annotations

import os

from sentiment_ray.config import RayConfig


def local_cpus() -> int:
    """Logical CPUs for a Ray this process starts: one more than the cores, so that actors reserving every
    core (a scoring pool, a training worker) never starve Ray Data's read and write tasks, which on a
    2-core machine would hang the job without an error."""
    return (os.cpu_count() or 1) + 1


def ensure_ray(cfg: RayConfig) -> None:
    """`address=None`: join RAY_ADDRESS or a running `ray start --head` cluster, else start Ray in-process;
    `address="local"`: always a private in-process Ray; anything else: that cluster."""
    import ray

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
