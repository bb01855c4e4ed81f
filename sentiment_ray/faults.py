"""Test hooks that inject failures into a scoring run, so that recovery is proven rather than assumed.

Read from the environment of the driver (the `score` command) and handed to every actor with its constructor
arguments, because actors of an already-running Ray do not see variables set after Ray started.

- `SENTIMENT_RAY_FAULT_ACTOR_EXIT_AFTER_BATCHES=N`: an actor kills its own process (`os._exit(1)`, no cleanup,
  as a lost node would) after scoring N batches, in the middle of a work unit. Only once per run: the first
  actor to get there creates `SENTIMENT_RAY_FAULT_MARKER` (default: a file in the output's work folder), and an
  actor that finds the marker already there carries on.
- `SENTIMENT_RAY_FAULT_FAIL_TEXT=word`: scoring a batch that holds a review containing `word` raises, every
  time: the batch retry and row-by-row fallback must then mark exactly that row as `error`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

EXIT_AFTER_BATCHES = "SENTIMENT_RAY_FAULT_ACTOR_EXIT_AFTER_BATCHES"
MARKER = "SENTIMENT_RAY_FAULT_MARKER"
FAIL_TEXT = "SENTIMENT_RAY_FAULT_FAIL_TEXT"


class InjectedFault(RuntimeError):
    pass


@dataclass
class FaultPlan:
    exit_after_batches: int | None = None
    marker: str | None = None
    fail_text: str | None = None

    @classmethod
    def from_env(cls, default_marker: str) -> FaultPlan:
        exit_after = os.environ.get(EXIT_AFTER_BATCHES)
        return cls(exit_after_batches=int(exit_after) if exit_after else None,
                   marker=os.environ.get(MARKER) or default_marker,
                   fail_text=os.environ.get(FAIL_TEXT) or None)

    def to_dict(self) -> dict:
        return asdict(self)

    def maybe_fail(self, texts: list) -> None:
        if self.fail_text and any(isinstance(t, str) and self.fail_text in t for t in texts):
            raise InjectedFault(f"injected failure for a batch holding {self.fail_text!r} ({FAIL_TEXT})")

    def maybe_exit(self, batches_done: int) -> None:
        if self.exit_after_batches is None or batches_done < self.exit_after_batches:
            return
        try:  # O_EXCL: exactly one actor incarnation in the whole run wins the right to die
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        print(f"[score] fault injection: actor pid {os.getpid()} exits after {batches_done} batches", flush=True)
        os._exit(1)
