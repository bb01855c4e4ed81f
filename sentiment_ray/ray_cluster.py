"""Connecting to Ray: the cluster a job was submitted to, a running local one, or a private one."""

from __future__ import annotations

from sentiment_ray.config import RayConfig


def ensure_ray(cfg: RayConfig) -> None:
    """`address=None` joins RAY_ADDRESS or a running `ray start --head` cluster, else starts one in-process;
    `address="local"` always starts a private one (tests, the demo) with `num_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"address": cfg.address, "log_to_driver": True}
    if cfg.address == "local" and cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    ray.init(**kwargs)
