"""Logging: the CLI's -v/-q and SENTIMENT_RAY_LOG_LEVEL, the package logger only, and the level reaching Ray workers."""

import logging
import os
import subprocess
import sys
import uuid

import pytest

from sentiment_ray.cli import main
from sentiment_ray.ops.logging_setup import (
    LEVEL_ENV,
    PACKAGE_LOGGER,
    CurrentStderrHandler,
    configure_logging,
    configure_worker_logging,
    level_from_env,
)
from tests.conftest import REPO_ROOT, on_the_session_ray, write_reviews

INFO_LINE = "words (median"  # make_excerpt_set's INFO line: the excerpts' word counts
DEBUG_LINE = "labeled reviews (columns"  # its DEBUG line: what it read
RESULT_LINE = "excerpts of 8-60 words (seed 0) written to"  # the command's result, on stdout


@pytest.fixture(autouse=True)
def package_logger_restored():
    """main() configures the package logger of this process; later tests get it back as it was."""
    package = logging.getLogger(PACKAGE_LOGGER)
    saved = package.level, list(package.handlers)
    yield
    package.handlers[:] = saved[1]
    package.setLevel(saved[0])


@pytest.fixture
def reviews(tmp_path):
    return write_reviews(tmp_path / "dev.parquet", ["one two three four five six seven eight nine ten " * 3] * 4,
                         [1, 0, 1, 0])


def _excerpts(capsys, reviews, tmp_path, *flags, after: bool = False) -> tuple[str, str]:
    command = ["excerpts", "--input", str(reviews), "--output", str(tmp_path / f"out-{uuid.uuid4().hex[:8]}.parquet")]
    assert main([*command, *flags] if after else [*flags, *command]) == 0
    captured = capsys.readouterr()
    assert RESULT_LINE in captured.out  # the result is never a log line: no flag hides it
    return captured.out, captured.err


def test_default_level_logs_info_lines_to_stderr_not_debug(capsys, reviews, tmp_path, monkeypatch):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    out, err = _excerpts(capsys, reviews, tmp_path)
    assert INFO_LINE in err and " INFO sentiment_ray.training.excerpts: " in err
    assert DEBUG_LINE not in err and INFO_LINE not in out


@pytest.mark.parametrize("after", [False, True], ids=["before the command", "after the command"])
def test_quiet_silences_info_lines_and_verbose_shows_debug_lines(capsys, reviews, tmp_path, monkeypatch, after):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    _, err = _excerpts(capsys, reviews, tmp_path, "-q", after=after)
    assert err == ""
    _, err = _excerpts(capsys, reviews, tmp_path, "--verbose", after=after)
    assert DEBUG_LINE in err and " DEBUG sentiment_ray.training.excerpts: " in err and INFO_LINE in err


def test_the_flags_override_the_environment_variable(capsys, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv(LEVEL_ENV, "debug")
    _, err = _excerpts(capsys, reviews, tmp_path)
    assert DEBUG_LINE in err
    _, err = _excerpts(capsys, reviews, tmp_path, "-q")
    assert err == ""
    monkeypatch.setenv(LEVEL_ENV, "WARNING")
    _, err = _excerpts(capsys, reviews, tmp_path)
    assert err == ""
    _, err = _excerpts(capsys, reviews, tmp_path, "-v")
    assert DEBUG_LINE in err


def test_a_bad_level_in_the_environment_is_a_one_line_user_error(capsys, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv(LEVEL_ENV, "loud")
    assert main(["excerpts", "--input", str(reviews), "--output", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert err == ("sentiment-ray excerpts: error: SENTIMENT_RAY_LOG_LEVEL='loud' is not a log level; use one of "
                   "DEBUG, INFO, WARNING, ERROR, CRITICAL\n")
    assert not (tmp_path / "x.parquet").exists()


def test_the_environment_variable_reaches_the_console_script(reviews, tmp_path):
    """The installed command in its own process, as a job runs it: the level from the environment alone."""
    env = {**os.environ, LEVEL_ENV: "DEBUG", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "sentiment_ray.cli", "excerpts", "--input", str(reviews),
                             "--output", str(tmp_path / "x.parquet")], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert DEBUG_LINE in result.stderr and INFO_LINE in result.stderr and RESULT_LINE in result.stdout


def test_only_the_package_logger_is_configured():
    ray_logger = logging.getLogger("ray")
    before = ray_logger.level, list(ray_logger.handlers), ray_logger.propagate
    root_handlers = list(logging.getLogger().handlers)
    configure_logging(logging.DEBUG)
    configure_logging(logging.DEBUG)  # again, as every Ray task does: still one handler
    package = logging.getLogger(PACKAGE_LOGGER)
    assert package.level == logging.DEBUG
    assert len([h for h in package.handlers if isinstance(h, CurrentStderrHandler)]) == 1
    assert (ray_logger.level, list(ray_logger.handlers), ray_logger.propagate) == before
    assert logging.getLogger().handlers == root_handlers


def test_the_handler_writes_to_the_stderr_of_the_moment(capsys):
    configure_logging(logging.INFO)
    capsys.readouterr()
    logging.getLogger("sentiment_ray.somewhere").info("after the stream was replaced")
    assert "after the stream was replaced" in capsys.readouterr().err


def test_worker_level_falls_back_to_the_environment_then_info(monkeypatch):
    package = logging.getLogger(PACKAGE_LOGGER)
    configure_worker_logging(logging.WARNING)
    assert package.level == logging.WARNING
    monkeypatch.setenv(LEVEL_ENV, "error")
    configure_worker_logging(None)
    assert package.level == logging.ERROR
    monkeypatch.setenv(LEVEL_ENV, "not-a-level")  # a worker carries on; the driver has refused it already
    configure_worker_logging(None)
    assert package.level == logging.INFO
    assert level_from_env({}) == logging.INFO and level_from_env({LEVEL_ENV: " "}) == logging.INFO


def test_a_worker_whose_root_logger_has_handlers_logs_through_them(monkeypatch):
    """Ray Train's workers (and a job's ray.LoggingConfig) configure the root logger: a handler of the package's
    own would print every line twice there."""
    package = logging.getLogger(PACKAGE_LOGGER)
    root_handler = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [root_handler])
    configure_logging(logging.INFO)  # as if an earlier task in this worker process had added one
    configure_worker_logging(logging.DEBUG)
    assert package.level == logging.DEBUG
    assert not [h for h in package.handlers if isinstance(h, CurrentStderrHandler)] and package.propagate


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scoring_actors_log_at_the_drivers_level(ray_session, random_adapter, tmp_path):
    """`score -v` in its own process, joining the session's Ray as a command joins a cluster: the scoring actors'
    debug lines reach the driver's output (Ray forwards its job's workers' output), which they would not at the
    workers' default level (INFO)."""
    reviews = write_reviews(tmp_path / "in.parquet", ["good", "bad", "fine", "awful"], ids=["a", "b", "c", "d"])
    env, address = on_the_session_ray(ray_session)
    env.pop(LEVEL_ENV, None)
    command = [sys.executable, "-m", "sentiment_ray.cli", "score", "-v", "--config",
               str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "--adapter", str(random_adapter), "--input",
               str(reviews), "--output", str(tmp_path / "out"), "model.dtype=float32", f"ray.address={address}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280, check=False, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    actor_lines = [line for line in output.splitlines() if "ScoreStage" in line and "pid=" in line]
    assert any("DEBUG sentiment_ray.scoring.stages: scored a batch of" in line for line in actor_lines), output[-3000:]
    assert "INFO sentiment_ray.scoring.job: 4 rows in 1 file(s)" in result.stderr


def test_ray_datas_errors_stay_off_the_console_and_its_info_lines_do_not():
    """A damaged row group made Ray Data print 135 lines of tracebacks before the command's one line."""
    import logging

    from sentiment_ray.ops.logging_setup import _ErrorsToLogFileOnly, ray_data_errors_to_log_file

    ray_data_errors_to_log_file()
    ray_data_errors_to_log_file()  # once is enough: no second filter
    console = [h for h in logging.getLogger("ray.data").handlers if "File" not in type(h).__name__]
    assert console and all(sum(isinstance(f, _ErrorsToLogFileOnly) for f in h.filters) == 1 for h in console)
    error = logging.LogRecord("ray.data.x", logging.ERROR, __file__, 1, "Full stack trace", None, None)
    info = logging.LogRecord("ray.data.x", logging.INFO, __file__, 1, "Starting execution", None, None)
    assert [bool(h.filter(error)) for h in console] == [False] * len(console)
    assert all(h.filter(info) for h in console)
