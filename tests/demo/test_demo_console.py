"""The demo's console: short lines on the terminal, everything else (Python, C, subprocesses) in the log file."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

# Run in a process of its own: the redirect is of the process's file descriptors 1 and 2, which pytest holds.
SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys
    from pathlib import Path
    from sentiment_ray.demo.console import demo_console
    from sentiment_ray.ops.logging_setup import configure_logging

    configure_logging(logging.INFO)  # as the CLI does before the demo
    print("before the demo", flush=True)
    with demo_console(Path(sys.argv[1]), logging.INFO) as console:
        logging.getLogger("sentiment_ray.demo.job").info("[1/5] a step")
        logging.getLogger("sentiment_ray.scoring.job").info("a line of the library: rows into %s",
                                                            Path(sys.argv[1]).parent / "scored")
        logging.getLogger("sentiment_ray.scoring.job").debug("a debug line of the library")
        logging.getLogger("sentiment_ray.training.job").warning("a warning")
        print("a print of Python")
        sys.stderr.write("a write to stderr\\n")
        subprocess.run(["sh", "-c", "echo a subprocess; echo its stderr >&2"], check=True)
        os.write(2, b"a write to file descriptor 2\\n")
        logging.getLogger("ray.data").warning("a line of Ray")
        assert os.environ["TQDM_DISABLE"] == "1"
        console.write("the result table\\n")
    assert "TQDM_DISABLE" not in os.environ
    print("after the demo")
    logging.getLogger("sentiment_ray.x").info("the CLI's handler is back")
""")


def test_the_console_keeps_the_steps_and_the_log_file_takes_the_rest(tmp_path):
    log_file = tmp_path / "demo.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TQDM_DISABLE", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(log_file)], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "before the demo",
        "[1/5] a step",
        "      a line of the library: rows into scored",
        "      WARNING: a warning",
        "the result table",
        "after the demo",
    ]
    assert result.stderr.splitlines()[-1].endswith(" INFO sentiment_ray.x: the CLI's handler is back")
    assert "a print of Python" not in result.stderr
    log = log_file.read_text()
    for line in ("INFO sentiment_ray.demo.job: [1/5] a step",
                 "DEBUG sentiment_ray.scoring.job: a debug line of the library",
                 "WARNING sentiment_ray.training.job: a warning", "a print of Python", "a write to stderr",
                 "a subprocess", "its stderr", "a write to file descriptor 2", "a line of Ray"):
        assert line in log, line
    assert "the result table" not in log and "before the demo" not in log
