"""One run per output: a live holder refuses a second run; a dead one (SIGKILL) holds nothing."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sentiment_ray.cli import main
from sentiment_ray.io import run_lock
from sentiment_ray.io.run_lock import (
    OutputLockedError,
    RunLock,
    StoreRunLock,
    canonical_output,
    lock_for_output,
    lock_path,
)
from sentiment_ray.scoring import PLAN_FILE
from tests.conftest import write_reviews

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sentiment_ray.io.run_lock import RunLock
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


# ------------------------------------------------------------------------------------------ however it is spelled

HOLD_SPELLED = textwrap.dedent("""
    import sys, time
    from sentiment_ray.io.run_lock import lock_for_output
    lock_for_output(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_one_local_output_is_one_lock_whatever_its_spelling(tmp_path, monkeypatch):
    real = tmp_path / "data"
    final = real / "scored"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(real)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SPELLED, f"file://{final}"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for spelling in ("scored", "./scored/", str(tmp_path / "link" / "scored"), "~/data/scored",
                         "~/link/../data/scored", str(final)):
            with pytest.raises(OutputLockedError, match=rf"into {final} \(pid {holder.pid} "):
                lock_for_output(spelling).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert canonical_output("file://" + str(tmp_path / "link" / "scored")) == str(final)


def _race(spellings, make_lock):
    """Every spelling's lock acquired at the same moment from its own thread: (winners, refusals)."""
    barrier = threading.Barrier(len(spellings))
    won, refused = [], []

    def run(spelling):
        lock = make_lock(spelling)
        barrier.wait()
        try:
            won.append(lock.acquire())
        except OutputLockedError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=run, args=(s,)) for s in spellings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


@pytest.mark.parametrize("conditional", [True, False], ids=["if-none-match", "read-back"])
def test_two_runs_racing_into_one_s3_output_under_two_spellings_one_wins(s3_server, monkeypatch, conditional):
    bucket = s3_server.create_bucket(f"lock-race-{conditional}".lower())
    monkeypatch.setattr(run_lock, "SETTLE_SECONDS", 0.3)
    spellings = [f"{bucket}/out", f"{bucket}//out/", f"{bucket}/x/../out"]

    def make(spelling):
        lock = lock_for_output(spelling)
        if not conditional:  # a store that offers no conditional write: found by reading the lock back
            lock.store = run_lock.LockStore(lock.store.key_uri)
        return lock

    won, refused = _race(spellings, make)
    assert len(won) == 1 and len(refused) == 2, refused
    assert all(f"another run is writing into {bucket}/out (pid {os.getpid()} " in r for r in refused)
    won[0].verify()  # the winner keeps its lock and may commit
    won[0].release()
    lock_for_output(f"{bucket}/out").acquire().release()  # released: free again


def test_a_crashed_runs_s3_lock_expires_after_its_lease_and_the_stalled_run_may_not_commit(s3_server):
    bucket = s3_server.create_bucket("lock-lease")
    stalled = StoreRunLock(f"{bucket}/out", run_lock.S3LockStore(f"{bucket}/.out.lock"), lease_seconds=1.5)
    stalled.acquire()
    stalled._stop.set()  # its heartbeat stops, as a crashed or stalled run's does; the lock object stays
    stalled._thread.join()
    with pytest.raises(OutputLockedError, match="expires 2 s after its last renewal"):
        StoreRunLock(f"{bucket}/out", run_lock.S3LockStore(f"{bucket}/.out.lock"), lease_seconds=1.5).acquire()
    time.sleep(1.5 + 1.2)  # S3 dates its objects and its replies to the second: the lease is judged within 1 s
    taker = StoreRunLock(f"{bucket}/out", run_lock.S3LockStore(f"{bucket}/.out.lock"), lease_seconds=1.5).acquire()
    with pytest.raises(OutputLockedError, match=f"this run lost the lock of {bucket}/out to another run"):
        stalled.verify()
    stalled.release()  # deletes nothing of the new holder's
    taker.verify()
    taker.release()


def test_score_into_an_s3_output_another_run_holds_exits_2_and_deletes_nothing(s3_server, ray_must_not_start,
                                                                             tmp_path, capsys):
    import pyarrow.fs as pafs

    bucket = s3_server.create_bucket("lock-cli")
    reviews = write_reviews(tmp_path / "in.parquet", ["fine"], ids=["a"])
    store = pafs.FileSystem.from_uri(bucket)[0]
    with store.open_output_stream(f"{bucket[5:]}/scored/{PLAN_FILE}") as stream:
        stream.write(b"{}")  # the winner's work: the loser's --overwrite must not delete it
    with lock_for_output(f"{bucket}/scored"):
        code = main(["score", "--input", str(reviews), "--output", f"{bucket}//scored/", "--adapter",
                     str(tmp_path / "adapter"), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"another run is writing into {bucket}/scored (pid {os.getpid()}" in err
    infos = store.get_file_info(pafs.FileSelector(bucket[5:], recursive=True))
    assert sorted(i.path for i in infos if i.type == pafs.FileType.File) == [f"{bucket[5:]}/scored/{PLAN_FILE}"]
