"""Output folders that are never overwritten silently and never look finished while half-written.

Results are written into a hidden sibling `.<name>.tmp-<random>` and renamed into place only when complete,
so a crash leaves the final name absent rather than holding a partial result.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_output_free(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    if "://" in str(path):
        # Outputs are committed by renaming a staging folder, which object stores cannot do atomically.
        raise OutputExistsError(f"output {path}: write outputs to a local or mounted shared filesystem path; "
                                "object-store URIs are supported for inputs only")
    path = Path(path).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
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
