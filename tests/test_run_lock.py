"""One run per output: a live holder refuses a second run; a dead one (SIGKILL) holds nothing."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sentiment_ray.cli import main
from sentiment_ray.run_lock import OutputLockedError, RunLock, lock_path
from sentiment_ray.scoring import PLAN_FILE
from tests.conftest import write_reviews

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sentiment_ray.run_lock import RunLock
    RunLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(final):
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(final)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_live_run_refuses_a_second_one_and_names_itself(tmp_path):
    final = tmp_path / "scored"
    holder = _holder(final)
    try:
        with pytest.raises(OutputLockedError, match=rf"another run is writing into {final} \(pid {holder.pid} on "):
            RunLock(final).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_holds_nothing(tmp_path):
    final = tmp_path / "scored"
    holder = _holder(final)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup at all: the lock file stays, the kernel drops the flock
    holder.wait()
    assert lock_path(final).exists()
    with RunLock(final):
        assert lock_path(final).exists()
    assert not lock_path(final).exists()  # removed when the run ends


def test_the_lock_is_taken_again_after_release_and_is_exclusive_within_a_process(tmp_path):
    final = tmp_path / "scored"
    first = RunLock(final).acquire()
    with pytest.raises(OutputLockedError):  # flock is per open file, so a second open in one process is refused too
        RunLock(final).acquire()
    first.release()
    RunLock(final).acquire().release()


def test_score_into_an_output_that_another_run_holds_exits_2_before_touching_anything(tmp_path, random_adapter, capsys):
    reviews = write_reviews(tmp_path / "in.parquet", ["fine"], ids=["a"])
    final = tmp_path / "scored"
    final.mkdir()
    (final / PLAN_FILE).write_text("{}")  # the holder's work: --overwrite must not delete it under its feet
    holder = _holder(final)
    try:
        code = main(["score", "--input", str(reviews), "--output", str(final), "--adapter", str(random_adapter),
                     "--overwrite"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"another run is writing into {final}" in err and f"pid {holder.pid}" in err
    assert (final / PLAN_FILE).read_text() == "{}" and sorted(p.name for p in final.iterdir()) == [PLAN_FILE]
