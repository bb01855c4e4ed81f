"""Ray metrics of the scoring and finetune jobs, for the Ray dashboard and Prometheus (`ray.util.metrics`).

Each Ray node's metrics agent exports what the processes on that node recorded, in Prometheus text at
`http://<node>:<metrics export port>/metrics` (`ray start --metrics-export-port=8080`; KubeRay sets 8080 on every
pod), named `ray_<name>`, counters `ray_<name>_total`, with Ray's own tags (`NodeAddress`, `WorkerId`,
`SessionName`, ...) beside ours. The agent flushes every few seconds, so a value shows up with that delay.

    scoring (tag `run`: the output folder's URI, the same across resumes of one output)
      sentiment_ray_score_rows_scored        counter  rows the score stage scored (status ok)
      sentiment_ray_score_rows_marked        counter  rows passed on unscored, tag `status` (empty_text, error, ...)
      sentiment_ray_score_rows_per_second    gauge    one scoring actor's rate (Ray's `WorkerId` tells them apart)
      sentiment_ray_score_units_committed    counter  work units whose rows this run has all written
    finetune (tag `run`: the Ray Train run name, ray.run_name)
      sentiment_ray_finetune_step            gauge    the optimizer step last logged
      sentiment_ray_finetune_loss            gauge    the training loss last logged
      sentiment_ray_finetune_tokens_per_second  gauge  non-padding tokens/s since the previous log

The counters count work done: rows of a batch that Ray retried after its actor died count again. The exact
counts of a finished output are in its manifest. Metrics are recorded once per batch, per write or per logged
step, never per row, and recording never reaches the job: in a process without Ray or without a metrics agent
it records into nothing, and an error in it is logged and dropped.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sentiment_ray.model.scorer import STATUS_OK

if TYPE_CHECKING:  # imported where the metrics are made: a process that only reads this module needs no Ray
    from ray.util.metrics import Counter, Gauge

logger = logging.getLogger(__name__)

PREFIX = "sentiment_ray_"
RUN_TAG = "run"
STATUS_TAG = "status"
# The rows/s gauge is refreshed at most this often per actor: a rate over a few batches is steadier than one
# batch's, and a scrape (every 15-30 s typically) sees a recent value either way.
RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class ScoreMetrics:
    rows_scored: Counter
    rows_marked: Counter  # tags run and status
    rows_per_second: Gauge
    units_committed: Counter


@dataclass(frozen=True)
class FinetuneMetrics:
    step: Gauge
    loss: Gauge
    tokens_per_second: Gauge


@functools.cache
def score_metrics() -> ScoreMetrics:
    """The scoring metrics, defined once per process (every process defines them alike, as Ray requires)."""
    from ray.util.metrics import Counter, Gauge

    return ScoreMetrics(
        rows_scored=Counter(f"{PREFIX}score_rows_scored", "Rows the score stage scored (status ok).", (RUN_TAG,)),
        rows_marked=Counter(f"{PREFIX}score_rows_marked", "Rows kept unscored, by status (empty_text, "
                            "invalid_utf8, non_string_text, no_tokens, error).", (RUN_TAG, STATUS_TAG)),
        rows_per_second=Gauge(f"{PREFIX}score_rows_per_second", "Rows per second of one scoring actor, over its "
                              f"last {RATE_WINDOW_S:.0f} s of batches.", (RUN_TAG,)),
        units_committed=Counter(f"{PREFIX}score_units_committed", "Work units whose rows this run has all "
                                "written to the output.", (RUN_TAG,)),
    )


@functools.cache
def finetune_metrics() -> FinetuneMetrics:
    from ray.util.metrics import Gauge

    return FinetuneMetrics(
        step=Gauge(f"{PREFIX}finetune_step", "The optimizer step last logged by the training worker.", (RUN_TAG,)),
        loss=Gauge(f"{PREFIX}finetune_loss", "The training loss last logged (mean over the logging interval).",
                   (RUN_TAG,)),
        tokens_per_second=Gauge(f"{PREFIX}finetune_tokens_per_second", "Non-padding training tokens per second "
                                "since the previous log.", (RUN_TAG,)),
    )


def _never_raises(method):
    """Metrics are a view on the job, never a reason for it to fail."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        try:
            method(*args, **kwargs)
        except Exception:  # noqa: BLE001 - whatever goes wrong in recording, the job goes on
            logger.debug("recording a metric failed", exc_info=True)

    return guarded


class ScoreStageRecorder:
    """What one scoring actor records after each batch: its rows by status, and its rate now and then."""

    def __init__(self, run: str):
        self.tags = {RUN_TAG: run}
        self.window_start: float | None = None
        self.window_rows = 0

    @_never_raises
    def record_batch(self, statuses: Iterable[str | None], started: float, ended: float) -> None:
        metrics = score_metrics()
        tally = Tally(statuses)
        if tally[STATUS_OK]:
            metrics.rows_scored.inc(tally[STATUS_OK], tags=self.tags)
        for status, rows in tally.items():
            if status != STATUS_OK:
                metrics.rows_marked.inc(rows, tags={**self.tags, STATUS_TAG: str(status)})
        first = self.window_start is None
        if first:
            self.window_start = started
        self.window_rows += sum(tally.values())
        elapsed = ended - self.window_start
        if elapsed > 0 and (first or elapsed >= RATE_WINDOW_S):  # the first batch: a value from the start
            metrics.rows_per_second.set(self.window_rows / elapsed, tags=self.tags)
            self.window_start, self.window_rows = ended, 0


@_never_raises
def record_units_committed(run: str, units: int) -> None:
    if units:
        score_metrics().units_committed.inc(units, tags={RUN_TAG: run})


class FinetuneRecorder:
    """What the training worker records at each Trainer log: step, loss and tokens/s since the previous log."""

    def __init__(self, run: str):
        self.tags = {RUN_TAG: run}
        self.last: tuple[float, int] | None = None  # (time, tokens seen) at the previous log or the start

    def start(self, tokens_seen: int, now: float | None = None) -> None:
        """At the start of training; a resumed run starts from the tokens its checkpoint had seen."""
        self.last = (time.perf_counter() if now is None else now, tokens_seen)

    @_never_raises
    def record_log(self, step: int, loss: float | None, tokens_seen: int, now: float | None = None) -> None:
        metrics = finetune_metrics()
        now = time.perf_counter() if now is None else now
        metrics.step.set(step, tags=self.tags)
        if loss is not None:
            metrics.loss.set(float(loss), tags=self.tags)
        if self.last is not None and now > self.last[0] and tokens_seen > self.last[1]:
            metrics.tokens_per_second.set((tokens_seen - self.last[1]) / (now - self.last[0]), tags=self.tags)
        self.last = (now, tokens_seen)
