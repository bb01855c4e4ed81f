"""The driver's side of a lost node (sentiment_ray/scoring/node_loss.py), without a cluster: which stage fits
the nodes left, how many scoring actors a re-formed pipeline gets, the bounded wait's one line; and, on the
session's Ray, that a stopped pipeline's actors are killed rather than left to score what is queued on them."""

from __future__ import annotations

import time

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


# ------------------------------------------------------------------------------------------ the stopped pipeline

BATCHES, BATCH_S = 24, 0.25  # a pipeline that would run ~6 s: it is stopped after ~1 s with batches queued


def _counting_stage():
    """A scoring stage stand-in: each batch takes BATCH_S and leaves one line in a file (the actor's own count).
    Made in a function so that Ray ships the class by value: workers cannot import this test module by name."""

    class CountingStage:
        def __init__(self, folder: str):
            import os

            self.record = f"{folder}/batches-{os.getpid()}.txt"

        def __call__(self, batch):
            time.sleep(BATCH_S)
            with open(self.record, "a") as record:
                record.write("batch\n")
            return batch

    return CountingStage


def _batches_scored(folder) -> int:
    return sum(len(path.read_text().splitlines()) for path in folder.glob("batches-*.txt"))


@pytest.mark.timeout(120)
def test_a_pipeline_stopped_for_a_lost_node_has_its_actors_killed_and_they_score_nothing_after(ray_session,
                                                                                               tmp_path,
                                                                                               monkeypatch):
    """The soak run of issue 28: the stopped pipeline's scoring actor ran its 98 queued batches for nothing. Here a
    pipeline whose actor has 4 batches queued is stopped by the lost-node callback once the actor has scored 2
    (a node of its start that is not alive: the same NodeLost as a node's death), and end_pipeline kills the
    actor the callback recorded."""
    import ray

    from sentiment_ray.scoring.job import _raise_known_error
    from sentiment_ray.scoring.lost_node_callback import watching

    check_nodes = node_loss.check_nodes
    monkeypatch.setattr(node_loss, "check_nodes",
                        lambda watch: check_nodes(watch) if _batches_scored(tmp_path) >= 2 else None)
    dataset = ray.data.range(BATCHES, override_num_blocks=BATCHES).map_batches(
        _counting_stage(), fn_constructor_kwargs={"folder": str(tmp_path)}, batch_size=1, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=4))
    gone = "f" * 56  # a node id no node has: the callback's first check after 2 batches finds it dead
    with watching(dataset, set(node_loss.alive_nodes()) | {gone}) as watch:
        with pytest.raises(Exception) as stopped:
            dataset.materialize()
        actors = list(watch.actors)  # as the callback recorded them at the executor's last step
        assert len(actors) == 1
        with pytest.raises(NodeLost, match="lost 1 node"):
            _raise_known_error(stopped.value, watch)  # what the job does: end_pipeline, then NodeLost
    scored_at_stop = _batches_scored(tmp_path)
    assert 2 <= scored_at_stop < BATCHES - 4  # stopped mid-run, with batches left to queue
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    time.sleep(4 * BATCH_S + 0.5)  # longer than the 4 batches queued on the actor would have taken
    assert _batches_scored(tmp_path) == scored_at_stop  # no batch scored after the stop
