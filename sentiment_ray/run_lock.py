"""One run at a time per output: a lock that a live run holds and a dead one cannot keep.

Two `score` runs into the same output would both write its work units and race at the commit. The lock is an
advisory `flock` on a hidden sibling of the output (`.<name>.lock`): the kernel releases it when the holding
process dies, however it dies (SIGKILL, OOM, a lost terminal), so a crashed run never blocks its own `--resume`.
The file records who holds it, for the message the second run gets. It is taken before anything in the output's
work folder is touched (`--overwrite` deletes that folder) and removed when the run ends.

flock works on local disks and on NFSv4 (Linux maps it onto POSIX byte-range locks there); the lock is held by
the driver, which is the only process that creates, deletes or commits the output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sentiment_ray.outputs import OutputExistsError, check_writable, resolve_output


class OutputLockedError(OutputExistsError):
    """Another live run holds the output."""


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


class RunLock:
    """`with RunLock(final): ...` — refuses with OutputLockedError while another live process holds `final`."""

    def __init__(self, final: Path):
        self.final = final
        self.path = lock_path(final)
        self._fd: int | None = None

    @classmethod
    def for_output(cls, output: str | Path) -> RunLock | contextlib.nullcontext:
        """The lock of a local output path. Object-store outputs cannot be flock'ed (and are refused as outputs
        right after this, by sentiment_ray.outputs), so they get no lock rather than a stray local folder."""
        if "://" in str(output):
            return contextlib.nullcontext()
        final = resolve_output(output)  # the home folder or a root is refused before a lock file lands beside it
        check_writable(final)  # one clear line, not the lock file's PermissionError
        return cls(final)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"another run is writing into {self.final} ({holder}); wait for it to finish, or stop it and "
                    "rerun with --resume") from None
            # The holder before us may have removed the file between our open and our flock: then we locked an
            # orphaned inode that nobody else will see, so start over on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: see the inode check in acquire
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 4096) or b"{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "its process details are unknown"

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
