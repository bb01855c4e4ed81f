"""SIGTERM ends a command the way Ctrl-C does.

SIGTERM is what KubeRay (a pod being stopped), `ray job stop` and most schedulers send. Raised as `Terminated`, a
KeyboardInterrupt, it takes the path a Ctrl-C takes: the run lock is released, a training run is asked to stop
(train.py), nothing is committed that is not complete, and the CLI ends with one line and exit 143, leaving an
output that `--resume` (or a rerun with the same ray.run_name) finishes. Left to Python's default, SIGTERM kills
the process at once; left to Ray's (ray.init installs one), it exits 15 with no word of what to do next.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM. A KeyboardInterrupt so that every `except KeyboardInterrupt` cleanup applies and
    no `except Exception` swallows it."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within it (in the main thread; signals reach no other), SIGTERM raises Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def keep_sigterm_handler():
    """Around ray.init, which installs a SIGTERM handler of its own (sys.exit(15)): ours is put back where it was
    installed. Another caller's handler (or none) is left as Ray sets it."""
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, _on_sigterm)
