"""Resource requests that no node can ever meet are refused before any work, naming the setting, the request and
the largest node; where an autoscaler may add a larger node, they are only warned about."""

import logging

import pytest

from sentiment_ray.cli import USER_ERRORS
from sentiment_ray.config import FinetuneConfig, ScoreConfig, load_config
from sentiment_ray.ops.ray_cluster import ResourceRequest, UnmeetableResourcesError, check_requests_fit
from sentiment_ray.training.job import finetune_requests

GIB = 2**30
TWO_CPU_NODES = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * GIB}},
                 {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0, "memory": 4 * GIB}},
                 {"Alive": False, "Resources": {"CPU": 64.0}}]  # a dead node holds nothing


def _scoring(cpus=1.0, gpus=0.0, **custom) -> ResourceRequest:
    return ResourceRequest("each scoring actor", {"CPU": cpus, "GPU": gpus, **custom},
                           {"CPU": "num_cpus_per_actor", "GPU": "num_gpus_per_actor",
                            **{k: f"actor_resources.{k}" for k in custom}})


def test_a_request_no_node_can_meet_is_refused_naming_setting_request_and_largest_node():
    assert issubclass(UnmeetableResourcesError, USER_ERRORS)  # exit 2, one line
    cases = [
        (_scoring(cpus=4), r"^num_cpus_per_actor=4: each scoring actor asks for 4 CPU, but no node of the cluster "
                           r"has that much \(the largest has 2 CPU: 2 CPU, 0 GPU, 8\.0 GiB memory\); lower "
                           r"num_cpus_per_actor or add a node that has it$"),
        (_scoring(cpus=2, gpus=1), r"^num_cpus_per_actor=2, num_gpus_per_actor=1: each scoring actor asks for 2 CPU "
                                   r"and 1 GPU on one node, but no node .*by GPU: 1 CPU, 1 GPU, 4\.0 GiB memory\)"),
        (_scoring(scorer=1), r"^actor_resources\.scorer=1: each scoring actor asks for 1 scorer"),
        (_scoring(memory=16 * GIB), r"asks for 16\.0 GiB memory, .*the largest has 8\.0 GiB memory"),
    ]
    for request, message in cases:
        with pytest.raises(UnmeetableResourcesError, match=message):
            check_requests_fit([request], TWO_CPU_NODES, may_add_nodes=False)
    check_requests_fit([_scoring(cpus=2), _scoring(cpus=1, gpus=1)], TWO_CPU_NODES, may_add_nodes=False)


def test_a_cluster_that_may_grow_is_only_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="sentiment_ray.ops.ray_cluster"):
        check_requests_fit([_scoring(cpus=4)], TWO_CPU_NODES, may_add_nodes=True)
    assert "num_cpus_per_actor=4" in caplog.text and "until the cluster's autoscaler adds such a node" in caplog.text


def test_training_workers_are_checked_with_their_settings():
    cfg = load_config(FinetuneConfig, None, ["output_dir=out", "data.train=t.parquet", "ray.cpus_per_worker=3",
                                             "ray.use_gpu=true"])
    with pytest.raises(UnmeetableResourcesError, match=r"^ray.cpus_per_worker=3: each training worker asks for 3 CPU"):
        check_requests_fit(finetune_requests(cfg), TWO_CPU_NODES, may_add_nodes=False)


def test_on_a_ray_of_fixed_nodes_a_scoring_actor_too_big_is_refused(ray_session):
    """The real cluster of the tests (3 CPUs, started in-process: no autoscaler can add a node)."""
    from sentiment_ray.ops.ray_cluster import _autoscaler_may_add_nodes
    from sentiment_ray.scoring.job import score_requests

    assert _autoscaler_may_add_nodes() is False
    cfg = load_config(ScoreConfig, None, ["input=x", "output=y", "num_cpus_per_actor=4"])
    with pytest.raises(UnmeetableResourcesError, match=r"^num_cpus_per_actor=4: .*the largest has 3 CPU"):
        check_requests_fit(score_requests(cfg))
    check_requests_fit(score_requests(load_config(ScoreConfig, None, ["input=x", "output=y"])))
