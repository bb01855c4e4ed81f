"""The driver's side of a lost node (sentiment_ray/scoring/node_loss.py), without a cluster: which stage fits
the nodes left, how many scoring actors a re-formed pipeline gets, and the bounded wait's one line."""

from __future__ import annotations

import pytest

from sentiment_ray.ops.ray_cluster import ClusterTooSmallError
from sentiment_ray.scoring import node_loss
from sentiment_ray.scoring.node_loss import NodeLost, StageRequest, scoring_actors_that_fit, wait_for_room

SCORE = StageRequest("ScoreStage", {"CPU": 1.0, "GPU": 1.0})
PREPARE = StageRequest("PrepareStage", {"CPU": 1.0})
LOST = NodeLost(["a" * 56])


def test_a_reformed_pool_gets_the_scoring_actors_the_nodes_left_hold_at_most_its_size():
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0}, {"CPU": 16.0}]
    assert [SCORE.actors_on(n) for n in nodes] == [2, 1, 0]
    assert scoring_actors_that_fit(SCORE, nodes, wanted=8) == 3
    assert scoring_actors_that_fit(SCORE, nodes, wanted=2) == 2
    assert scoring_actors_that_fit(StageRequest("ScoreStage", {"CPU": 0.5}), [{"CPU": 1.5}], wanted=4) == 3


def test_the_missing_resource_is_the_one_no_node_has_enough_of():
    assert SCORE.missing([{"CPU": 4.0}]) == ["GPU"]
    assert SCORE.missing([{"CPU": 4.0}, {"GPU": 1.0}]) == ["CPU", "GPU"]  # each somewhere, never both on one


def test_the_wait_ends_as_soon_as_every_stage_fits_a_node(monkeypatch):
    answers = iter([{"head": {"CPU": 2.0}}, {"head": {"CPU": 2.0}, "new": {"CPU": 4.0, "GPU": 1.0}}])
    monkeypatch.setattr(node_loss, "alive_nodes", lambda: next(answers))
    nodes = wait_for_room([SCORE, PREPARE], wait_s=60, lost=LOST, poll_s=0)
    assert set(nodes) == {"head", "new"}


def test_a_stage_no_node_can_hold_stops_after_the_wait_with_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(node_loss, "alive_nodes", lambda: {"head": {"CPU": 2.0}})
    ticks = iter(range(0, 1000, 5))
    with pytest.raises(ClusterTooSmallError) as raised:
        wait_for_room([PREPARE, SCORE], wait_s=30, lost=LOST, poll_s=0, clock=lambda: next(ticks))
    message = str(raised.value)
    assert message == ("stage ScoreStage needs {'CPU': 1, 'GPU': 1} per actor and no node the cluster has left "
                       "after losing 1 node(s) has 'GPU' for it; waited 30 s (ray.wait_for_resources_s) for a node "
                       "to join; the output is resumable with --resume")
