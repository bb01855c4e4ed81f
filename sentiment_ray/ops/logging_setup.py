"""Logging for the command line, the Ray jobs and the Ray workers they start.

Every module logs through its own `logging.getLogger(__name__)`, so all of the library's records pass through
the package logger "sentiment_ray". `configure_logging` gives that one logger a level and one handler on stderr,
and touches nothing else: Ray's loggers ("ray", "ray.data", ...) keep the handlers and levels Ray gave them, and
other libraries keep theirs (a root-level DEBUG would bury the job's own lines under theirs).

The level: `-v`/`-q` on the command line, else the environment variable SENTIMENT_RAY_LOG_LEVEL (a level name),
else INFO. Ray workers (scoring actors, read tasks, the training worker) are separate processes that never run
the CLI: the driver hands them its level with their arguments and they call `configure_worker_logging`, so a
library log call inside a worker shows in the worker's log (and, forwarded by Ray, in the driver's output and
the job's logs) at the level the driver runs at.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from sentiment_ray.config import ConfigError

PACKAGE_LOGGER = "sentiment_ray"
LEVEL_ENV = "SENTIMENT_RAY_LOG_LEVEL"
DEFAULT_LEVEL = logging.INFO
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class CurrentStderrHandler(logging.StreamHandler):
    """Writes each record to whatever `sys.stderr` is when the record is emitted, not when the handler was made:
    a handler bound to the stream of its time keeps writing into a stream that was replaced and closed since
    (pytest's capture of an earlier test, the demo's redirect into its log file)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ and setStream assign it; the current stderr always wins
        pass


def parse_level(value: str, source: str = LEVEL_ENV) -> int:
    """A level name (any case) as a `logging` level; anything else is a ConfigError naming `source`."""
    name = value.strip().upper()
    if name not in LEVEL_NAMES:
        raise ConfigError(f"{source}={value!r} is not a log level; use one of {', '.join(LEVEL_NAMES)}")
    return logging.getLevelName(name)


def level_from_env(environ: Mapping[str, str] | None = None, default: int = DEFAULT_LEVEL) -> int:
    """SENTIMENT_RAY_LOG_LEVEL when it is set (and not empty), else `default`."""
    value = (os.environ if environ is None else environ).get(LEVEL_ENV, "")
    return parse_level(value) if value.strip() else default


def configure_logging(level: int, *, line_format: str = LINE_FORMAT) -> logging.Handler:
    """Set the package logger's level and give it one stderr handler (replacing the one an earlier call added,
    so calling it again, as every Ray task does, never doubles lines). Returns the handler."""
    package = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in package.handlers if isinstance(h, CurrentStderrHandler)]:
        package.removeHandler(handler)
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(line_format, DATE_FORMAT))
    package.addHandler(handler)
    package.setLevel(level)
    return handler


def level_for_workers() -> int:
    """The level the driver logs at, to hand to the Ray workers it starts (with their arguments: workers of a
    running cluster do not see the driver's environment)."""
    return logging.getLogger(PACKAGE_LOGGER).getEffectiveLevel()


def configure_worker_logging(level: int | None) -> None:
    """Called first in a Ray worker (task, actor, training worker): log at the driver's `level`; without one at
    SENTIMENT_RAY_LOG_LEVEL (as a job's runtime_env sets it), else INFO. A bad variable does not fail a worker:
    the driver has already refused it.

    Where the worker's root logger already has handlers, the package logger gets the level only and its records
    go to those handlers: Ray Train sets them up in its training workers (console and the run's application log
    file, at the run's LoggingConfig level), as does a job's `ray.LoggingConfig` in every worker. A handler of
    our own beside them would print each line twice. Elsewhere (Ray Data's tasks and actors) the root logger
    has none, and the package logger gets its own stderr handler, which Ray writes to the worker's log."""
    if level is None:
        try:
            level = level_from_env()
        except ConfigError:
            level = DEFAULT_LEVEL
    if not logging.getLogger().handlers:
        configure_logging(level)
        return
    package = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in package.handlers if isinstance(h, CurrentStderrHandler)]:
        package.removeHandler(handler)
    package.setLevel(level)


class _ErrorsToLogFileOnly(logging.Filter):
    """Keeps Ray Data's error records off the console. A read task that finds a damaged row group raises an
    InputError, and Ray Data prints it with three tracebacks and notices (135 lines for one file) before the
    command reports it in one line; a failure of Ray itself reaches the console as the command's own traceback.
    Ray Data's log file (`logs/ray-data/ray-data.log` in the Ray session's folder) still gets every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def ray_data_errors_to_log_file() -> None:
    """Install _ErrorsToLogFileOnly on the console handlers of Ray Data's logger (once; after `import ray.data`,
    which sets them up)."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger's handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if "File" in type(handler).__name__:
            continue
        if not any(isinstance(f, _ErrorsToLogFileOnly) for f in handler.filters):
            handler.addFilter(_ErrorsToLogFileOnly())
