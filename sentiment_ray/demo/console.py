"""The demo's console: its steps and its result on the screen, all the rest in a log file in its run folder.

Left alone, a demo run prints some 500 lines: Ray's start-up messages, Ray Data's progress, the workers' output
(weight-loading bars, the trainer's), pip's. Inside `demo_console` the package logger writes its INFO lines to
the console in a short form and everything from DEBUG up, with timestamps, to the log file; and the process's
standard output and error are pointed at the log file too, at the file-descriptor level, because much of that
output never passes through Python's `sys.stdout`: Ray's log monitor thread forwarding worker output, C++
components, subprocesses. Progress bars are switched off for the demo's duration, so the log file is readable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from sentiment_ray.ops.logging_setup import DATE_FORMAT, LINE_FORMAT, PACKAGE_LOGGER

DEMO_LOGGER = "sentiment_ray.demo.job"
# Inherited by the Ray workers a demo starts (they get the environment the driver has when Ray starts).
PROGRESS_BARS_OFF = {
    "TQDM_DISABLE": "1",  # tqdm itself: the trainer's bar
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' weight-loading bars follow it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map/filter bars in the training worker
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


class ConsoleFormatter(logging.Formatter):
    """The demo's own lines as they are; other modules' lines indented under the step they belong to, warnings
    and errors labelled; paths inside the run folder relative to it (its first line names it), so that a line
    fits the width of a terminal more often."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir_prefix = f"{run_dir}{os.sep}"

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name != DEMO_LOGGER:
            text = text.replace(self.run_dir_prefix, "")
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        return text if record.name == DEMO_LOGGER else f"      {text}"


@contextlib.contextmanager
def demo_console(log_file: Path, console_level: int = logging.INFO) -> Iterator[TextIO]:
    """Route the demo's output as the module docstring says; yields the console stream for the result table."""
    console, owned = _console_stream(sys.stdout)
    with (open(log_file, "a", buffering=1, encoding="utf-8", errors="replace") as log,
          _package_logging(console, console_level, log), _output_into(log), _progress_bars_off()):
        yield console
    if owned:
        console.close()


def _console_stream(stream: TextIO) -> tuple[TextIO, bool]:
    """A stream to the terminal that survives the redirect of file descriptors 1 and 2 (a duplicate of its file
    descriptor), and whether it is ours to close; a stream with no file descriptor (pytest's capture) as it is."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream, False
    stream.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace"), True


@contextlib.contextmanager
def _package_logging(console: TextIO, console_level: int, log: TextIO) -> Iterator[None]:
    """The package logger at DEBUG with two handlers (console at `console_level`, file at DEBUG) instead of the
    CLI's; put back as it was afterwards. The Ray workers get DEBUG from it too (logging_setup)."""
    package = logging.getLogger(PACKAGE_LOGGER)
    saved = package.level, list(package.handlers)
    to_console = logging.StreamHandler(console)
    to_console.setLevel(console_level)
    to_console.setFormatter(ConsoleFormatter(Path(log.name).parent))
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))
    for handler in saved[1]:
        package.removeHandler(handler)
    package.addHandler(to_console)
    package.addHandler(to_file)
    package.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        package.removeHandler(to_console)
        package.removeHandler(to_file)
        for handler in saved[1]:
            package.addHandler(handler)
        package.setLevel(saved[0])


@contextlib.contextmanager
def _output_into(log: TextIO) -> Iterator[None]:
    """File descriptors 1 and 2, and Python's sys.stdout and sys.stderr, into `log`; restored afterwards."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    saved_streams = sys.stdout, sys.stderr
    for fd in saved_fds:
        os.dup2(log.fileno(), fd)
    sys.stdout = sys.stderr = log
    try:
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    """No progress bars in this process (transformers, Ray Data) nor in the Ray workers the demo starts."""
    from ray.data import DataContext
    from transformers.utils import logging as transformers_logging

    saved_env = {name: os.environ.get(name) for name in PROGRESS_BARS_OFF}
    os.environ.update(PROGRESS_BARS_OFF)
    data_context = DataContext.get_current()
    ray_data_bars = data_context.enable_progress_bars
    data_context.enable_progress_bars = False
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_bars:
            transformers_logging.enable_progress_bar()
        data_context.enable_progress_bars = ray_data_bars
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
