"""The driver's progress line of a scoring run: its figures, its thread, and the ledger's row count it reads; the
ledger's per-actor activity."""

import logging
import time
from dataclasses import asdict

import pytest

from sentiment_ray.scoring.progress import ProgressReporter, format_duration, progress_line
from sentiment_ray.scoring.stages import RunLedger, StageActivity


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_durations_read_as_a_person_would_say_them():
    assert [format_duration(s) for s in (0, 59.4, 60, 575, 3599, 3600, 7500)] == [
        "0 s", "59 s", "1 min 00 s", "9 min 35 s", "59 min 59 s", "1 h 00 min", "2 h 05 min"]


def test_the_line_names_rows_done_of_total_rate_and_time_left():
    assert progress_line(1200, 10_000, 130, 15.3) == (
        "scored 1,200 of 10,000 rows (12%) in 2 min 10 s, 15.3 rows/s, about 9 min 35 s left")
    assert progress_line(0, 500, 40, None) == (
        "scored 0 of 500 rows (0%) in 40 s, no rows finished yet (the actors may still be loading the model)")


def test_the_rate_leaves_out_the_start_up_before_the_first_rows():
    clock, done = FakeClock(), [0]
    reporter = ProgressReporter(lambda: done[0], total=1000, clock=clock)
    clock.now += 60  # the actors load the model: nothing scored
    assert "no rows finished yet" in reporter.report()
    clock.now += 30
    done[0] = 100  # counted from the last report without rows: 100 rows in 30 s, not in 90
    assert reporter.report() == "scored 100 of 1,000 rows (10%) in 1 min 30 s, 3.3 rows/s, about 4 min 30 s left"
    clock.now += 30
    done[0] = 400
    assert reporter.report() == "scored 400 of 1,000 rows (40%) in 2 min 00 s, 6.7 rows/s, about 1 min 30 s left"


def test_rows_before_the_first_report_count_from_the_start():
    clock = FakeClock()
    reporter = ProgressReporter(lambda: 300, total=300, clock=clock)
    clock.now += 30
    assert reporter.report() == "scored 300 of 300 rows (100%) in 30 s, 10.0 rows/s, about 0 s left"


def test_the_thread_logs_lines_until_the_run_ends_and_survives_a_failing_count(caplog):
    calls = []

    def rows_done():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise TimeoutError("the ledger did not answer")
        return 10 * len(calls)

    with caplog.at_level(logging.DEBUG, logger="sentiment_ray.scoring.progress"):
        with ProgressReporter(rows_done, total=100, every_s=0.05):
            deadline = time.monotonic() + 10
            while len(calls) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
        stopped_at = len(calls)
        time.sleep(0.2)
    assert len(calls) == stopped_at >= 4  # no line after the run ended
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines[0].startswith("scored 10 of 100 rows (10%)") and lines[1].startswith("scored 30 of 100 rows")
    assert any("no progress line this time: TimeoutError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("actor", [None, "node-1"])
def test_the_ledger_counts_each_finished_batch_once(actor):
    ledger = RunLedger()  # the class itself: its counting, without an actor around it
    ledger.begin((0, 0))
    ledger.end((0, 0), actor, 1.0, 2.0, rows=64)
    ledger.begin((0, 64))
    ledger.end((0, 64), actor, 2.0, 3.0, rows=10)
    ledger.end((0, 64), actor, 3.0, 4.0, rows=10)  # its actor died after finishing it; Ray ran it again
    assert ledger.rows_scored() == 74


def test_the_ledger_reports_each_actors_share_and_when_it_ran():
    ledger = RunLedger()
    ledger.created = 100.0  # wall clock at the pipeline's start
    # Actor clocks are their own (monotonic); the wall clock places each actor's batches within the run.
    ledger.end((0, 0), "late", 50.0, 50.5, rows=8, wall_ended=112.5)
    ledger.end((0, 0), "early", 1.0, 2.0, rows=64, wall_ended=102.0)
    ledger.end((0, 64), "early", 2.5, 3.0, rows=36, wall_ended=103.0)
    stage = ledger.activity()
    assert (stage.actors, stage.batches, stage.busy_seconds, stage.active_seconds) == (2, 3, 2.0, 2.5)
    assert [(a.actor, a.batches, a.rows, a.busy_seconds, a.first_batch_offset, a.last_batch_offset)
            for a in stage.per_actor] == [("early", 2, 100, 1.5, 1.0, 3.0), ("late", 1, 8, 0.5, 12.0, 12.5)]
    # A manifest written before per-actor figures existed still reads.
    old = {k: v for k, v in asdict(stage).items() if k != "per_actor"}
    assert StageActivity.from_dict(old).per_actor == [] and StageActivity.from_dict(asdict(stage)) == stage


def test_the_ledger_and_the_manifest_record_the_quantization_each_actor_applied():
    """model.quantization as applied, not as asked: an actor where fp8 cannot run reports why."""
    from sentiment_ray.scoring.manifest import ScoreManifest

    ledger = RunLedger()
    ledger.created = 100.0
    ledger.actor_ready("gpu", 101.0, 1.0, "compiled_packed", None, "fp8_rowwise")
    ledger.actor_ready("cpu", 101.0, 1.0, "eager", None, "none (fp8 unavailable: no CUDA)")
    ledger.end((0, 0), "gpu", 1.0, 2.0, rows=8, wall_ended=102.0)
    ledger.end((0, 8), "cpu", 1.0, 2.0, rows=8, wall_ended=103.0)
    stage = ledger.activity()
    assert [(a.actor, a.quantization) for a in stage.per_actor] == [
        ("gpu", "fp8_rowwise"), ("cpu", "none (fp8 unavailable: no CUDA)")]
    assert ScoreManifest.applied_quantization(stage) == "fp8_rowwise; none (fp8 unavailable: no CUDA)"
    assert ScoreManifest.applied_quantization(None) is None  # nothing scored in this run
    # An actor of before the field (its readiness without it) and a manifest of before it still read.
    ledger.ready["cpu"].pop("quantization")
    assert [a.quantization for a in ledger.activity().per_actor] == ["fp8_rowwise", None]
    old = {k: v for k, v in asdict(stage).items()}
    for actor in old["per_actor"]:
        actor.pop("quantization")
    assert [a.quantization for a in StageActivity.from_dict(old).per_actor] == [None, None]
