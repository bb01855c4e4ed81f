"""Test hooks that inject failures into a scoring or finetune run, so that recovery is proven rather than assumed.

Read from the environment of the driver (the `score` or `finetune` command) and handed to every actor or
training worker with its arguments, because processes of an already-running Ray do not see variables set after
Ray started.

- `SENTIMENT_RAY_FAULT_ACTOR_EXIT_AFTER_BATCHES=N`: an actor kills its own process (`os._exit(1)`, no cleanup,
  as a lost node would) after scoring N batches, in the middle of a work unit. Only once per run: the first
  actor to get there creates `SENTIMENT_RAY_FAULT_MARKER` (default: a file in the system temp folder named after
  the output), and an actor that finds the marker already there carries on.
- `SENTIMENT_RAY_FAULT_FAIL_TEXT=word`: scoring a batch that holds a review containing `word` raises, every
  time: the batch retry and row-by-row fallback must then mark exactly that row as `error`.
- `SENTIMENT_RAY_FAULT_DISK_FULL_AFTER_FRAGMENTS=N`: once the output holds N scored fragments, writing another
  fails as a full disk does (`OSError` ENOSPC, raised inside the fragment's atomic write). For every write of
  the run: a `--resume` without the variable is the disk with space again.
- `SENTIMENT_RAY_FAULT_SLOW_BATCH_SECONDS=S`: every scoring batch, and every finetune optimizer step, takes S
  seconds longer, as on a slow or contended node, so that a test's few batches or steps outlast the start of a
  second actor or a node's removal.
- `SENTIMENT_RAY_FAULT_TRAIN_EXIT_AT_STEP=N`: the finetune worker kills its own process when optimizer step N
  ends, before that step's checkpoint is written; once per run, through the same marker (default: a file in the
  system temp folder named after the Ray Train run).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

EXIT_AFTER_BATCHES = "SENTIMENT_RAY_FAULT_ACTOR_EXIT_AFTER_BATCHES"
MARKER = "SENTIMENT_RAY_FAULT_MARKER"
FAIL_TEXT = "SENTIMENT_RAY_FAULT_FAIL_TEXT"
TRAIN_EXIT_AT_STEP = "SENTIMENT_RAY_FAULT_TRAIN_EXIT_AT_STEP"
DISK_FULL_AFTER_FRAGMENTS = "SENTIMENT_RAY_FAULT_DISK_FULL_AFTER_FRAGMENTS"
SLOW_BATCH_SECONDS = "SENTIMENT_RAY_FAULT_SLOW_BATCH_SECONDS"


class InjectedFault(RuntimeError):
    pass


@dataclass
class FaultPlan:
    exit_after_batches: int | None = None
    marker: str | None = None
    fail_text: str | None = None
    train_exit_at_step: int | None = None
    disk_full_after_fragments: int | None = None
    slow_batch_seconds: float | None = None

    @classmethod
    def from_env(cls, default_marker: str) -> FaultPlan:
        exit_after, exit_at_step = os.environ.get(EXIT_AFTER_BATCHES), os.environ.get(TRAIN_EXIT_AT_STEP)
        disk_full, slow = os.environ.get(DISK_FULL_AFTER_FRAGMENTS), os.environ.get(SLOW_BATCH_SECONDS)
        return cls(exit_after_batches=int(exit_after) if exit_after else None,
                   marker=os.environ.get(MARKER) or default_marker,
                   fail_text=os.environ.get(FAIL_TEXT) or None,
                   train_exit_at_step=int(exit_at_step) if exit_at_step else None,
                   disk_full_after_fragments=int(disk_full) if disk_full else None,
                   slow_batch_seconds=float(slow) if slow else None)

    def to_dict(self) -> dict:
        return asdict(self)

    def maybe_fail(self, texts: list) -> None:
        if self.fail_text and any(isinstance(t, str) and self.fail_text in t for t in texts):
            raise InjectedFault(f"injected failure for a batch holding {self.fail_text!r} ({FAIL_TEXT})")

    def maybe_stall(self) -> None:
        if self.slow_batch_seconds:
            time.sleep(self.slow_batch_seconds)

    def maybe_exit(self, batches_done: int) -> None:
        if self.exit_after_batches is not None and batches_done >= self.exit_after_batches:
            self._exit_once(f"fault injection: scoring actor pid {os.getpid()} exits after {batches_done} batches")

    def maybe_disk_full(self, fragments_written: Callable[[], int]) -> None:
        if self.disk_full_after_fragments is not None and fragments_written() >= self.disk_full_after_fragments:
            raise OSError(errno.ENOSPC, f"No space left on device (injected: {DISK_FULL_AFTER_FRAGMENTS})")

    def maybe_exit_training(self, step: int) -> None:
        if self.train_exit_at_step is not None and step >= self.train_exit_at_step:
            self._exit_once(f"fault injection: training worker pid {os.getpid()} exits at step {step}")

    def _exit_once(self, message: str) -> None:
        try:  # O_EXCL: exactly one process incarnation in the whole run wins the right to die
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        logger.warning(message)  # a handler writes and flushes before returning: the line is out before the exit
        os._exit(1)
