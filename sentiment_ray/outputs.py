"""Output folders that are never overwritten silently and never look finished while half-written.

Results are written into a hidden sibling `.<name>.tmp-<random>` and renamed into place only when complete,
so a crash leaves the final name absent rather than holding a partial result. A resumable job (scoring) keeps
its committed pieces in a hidden sibling with a fixed name, `.<name>.partial`, that a rerun can find again.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def _refuse_uri(path) -> None:
    if "://" in str(path):
        # Outputs are committed by renaming a staging folder, which object stores cannot do atomically.
        raise OutputExistsError(f"output {path}: write outputs to a local or mounted shared filesystem path; "
                                "object-store URIs are supported for inputs only")


def _holds_something(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_output_free(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    _refuse_uri(path)
    path = Path(path).expanduser().resolve()
    if _holds_something(path) and not overwrite:
        raise OutputExistsError(f"output {path} already exists; choose a new path or pass {flag} to replace it")
    return path


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"


def commit(staging: Path, final: Path, overwrite: bool) -> Path:
    """Move a finished staging folder to its final name (replacing an old one only with overwrite)."""
    if final.exists():
        if not overwrite and (not final.is_dir() or any(final.iterdir())):
            raise OutputExistsError(f"output {final} appeared while this run was writing; result kept in {staging}")
        backup = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(backup)
        staging.rename(final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(final)
    return final


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(temporary path)`, then rename onto `path`: readers see the old file, or none, or the whole new one."""
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class ResumableOutput:
    final: Path  # where the finished output appears, all at once
    work: Path  # `.<name>.partial`: committed pieces of an unfinished run, found again by --resume
    finished: bool  # resume found the final output already complete: nothing left to do


def open_resumable_output(path: str | Path, overwrite: bool, resume: bool, finished_marker: str) -> ResumableOutput:
    """Decide what a run may do with `path`: start fresh, continue an unfinished run (`resume`), or replace
    (`overwrite`). Anything else that is already there is refused with a message saying which flag to pass."""
    _refuse_uri(path)
    if overwrite and resume:
        raise OutputExistsError("pass either --resume (continue an earlier run) or --overwrite (start over), not both")
    final = Path(path).expanduser().resolve()
    work = final.parent / f".{final.name}.partial"
    if overwrite:
        shutil.rmtree(work, ignore_errors=True)  # ours (hidden, fixed name); the old final goes at commit
        return ResumableOutput(final, work, finished=False)
    if _holds_something(final):
        if resume and (final / finished_marker).is_file():
            return ResumableOutput(final, work, finished=True)
        if resume:
            raise OutputExistsError(f"output {final} exists but holds no {finished_marker}: it was not written by this "
                                    "tool, so there is nothing to resume; choose a new path or pass --overwrite")
        raise OutputExistsError(f"output {final} already exists; pass --resume to check it (a finished output is left "
                                "as it is) or --overwrite to replace it")
    if work.exists() and not resume:
        raise OutputExistsError(f"an earlier run into {final} stopped before finishing (its work is kept in {work}); "
                                "pass --resume to continue it or --overwrite to start over")
    return ResumableOutput(final, work, finished=False)
