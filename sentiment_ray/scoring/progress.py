"""The driver's progress line while a scoring run streams: rows scored, rows/s and the time left.

Ray Data's own progress (bars on a terminal, a periodic dump in a job's log) counts blocks and rows per operator.
This line counts what a person waits for: the rows of this run that the score stage has finished, out of the
rows the run has to score. The count comes from the run's ledger actor (stages.RunLedger), which every scoring
actor tells when it finishes a batch; the driver is blocked in the write meanwhile, so a thread asks the ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(done: int, total: int, elapsed_s: float, rows_per_s: float | None) -> str:
    """`scored 1,200 of 10,000 rows (12%) in 2 min 10 s, 15.3 rows/s, about 9 min 35 s left`."""
    share = f" ({100 * done / total:.0f}%)" if total else ""
    line = f"scored {done:,} of {total:,} rows{share} in {format_duration(elapsed_s)}"
    if not rows_per_s:
        return line + ", no rows finished yet (the actors may still be loading the model)"
    return f"{line}, {rows_per_s:.1f} rows/s, about {format_duration((total - done) / rows_per_s)} left"


class ProgressReporter:
    """Logs a progress line every `every_s` seconds from a daemon thread, while used as a context manager.

    rows/s is measured from the last report that found no rows scored yet, so the minutes the actors spend
    loading the model (to within one interval) do not drag the rate, and the time left, down for the rest of a
    long run."""

    def __init__(self, rows_done: Callable[[], int], total: int, every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.rows_done, self.total, self.every_s, self.clock = rows_done, total, every_s, clock
        self.started = self.counting_from = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sentiment-ray-progress", daemon=True)

    def report(self) -> str:
        """The line for now."""
        now, done = self.clock(), self.rows_done()
        if not done:
            self.counting_from = now
        rate = done / (now - self.counting_from) if done and now > self.counting_from else None
        return progress_line(done, self.total, now - self.started, rate)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                logger.info("%s", self.report())
            except Exception as exc:  # noqa: BLE001 - a progress line must never end the run it reports on
                logger.debug("no progress line this time: %s: %s", type(exc).__name__, exc)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
