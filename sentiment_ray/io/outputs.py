"""Output folders that are never overwritten silently and never look finished while half-written.

Results of `finetune` and `evaluate` are written into a hidden sibling `.<name>.tmp-<random>` and renamed into
place only when complete, so a crash leaves the final name absent rather than holding a partial result.
(`score` writes its output in place, on any storage, with its manifest as the commit marker:
sentiment_ray/scoring/output.py applies the same rules there.)

What may be replaced: `--overwrite` deletes only what this tool's own records say it wrote (sentiment_ray/
ownership.py): the files that the command's marker lists (the score manifest, the adapter's `sentiment_ray.json`,
evaluate's `metrics.json`) and the tool's hidden work files, matched by their exact names. Any other entry at the
output, of any name and at any depth, makes every command refuse it, whatever the flags. Whatever the flags, an
output may not be, contain or lie inside an input, the home directory or a filesystem root. These rules are
checked before any work starts, and the first one again when the result is committed.

An object-store output (s3://, gs://; `finetune` and `evaluate`) follows the same rules, a bucket root taking
the place of a filesystem root. Object stores cannot rename a folder, so a finished local folder is uploaded file
by file (each file atomically) with the marker last, and `.sentiment_ray_upload` marks the output unfinished until
then, listing the files of the old and the new output: a reader sees no marker, hence no finished output, and a
rerun with --overwrite may replace it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterable
from pathlib import Path, PurePath, PurePosixPath

from sentiment_ray.io.inputs import input_matches, pattern_could_match
from sentiment_ray.io.ownership import FILES_KEY, UPLOAD_MARKER, Survey, delete_own, survey
from sentiment_ray.io.storage import (
    Location,
    OutputWriteError,
    StorageError,
    StoreWriteError,
    is_uri,
    location,
    upload_folder,
    uri_path,
)

logger = logging.getLogger(__name__)

Legacy = Callable[[str], bool] | Collection[str]  # the relative paths a command writes (ownership.survey)


class OutputExistsError(FileExistsError):
    pass


class OutputNotWritableError(OutputExistsError):
    """The output's folder cannot be written. A subclass, so that everything that reports a refused output
    (cli.USER_ERRORS) reports this one too."""


def _refuse_uri(path) -> None:
    if "://" in str(path):
        raise OutputExistsError(f"output {path}: a local path is needed here")


def _refuse_protected(path: Path) -> None:
    """The home directory, a folder above it, or a filesystem root: never an output, whatever the flags."""
    home = Path.home().expanduser().resolve()
    if path == Path(path.anchor):
        raise OutputExistsError(f"output {path} is a filesystem root; choose a folder for this output")
    if path == home:
        raise OutputExistsError(f"output {path} is your home directory; choose a folder inside it")
    if home.is_relative_to(path):
        raise OutputExistsError(f"output {path} contains your home directory {home}; choose another folder")


def _file_not_ours(output: object, marker: str) -> OutputExistsError:
    return OutputExistsError(f"output {output} is a file not written by sentiment-ray; choose another path "
                             f"(--overwrite replaces only a folder holding {marker} or an empty folder)")


def own_output(output: Location, marker: str, legacy: Legacy = (), own_entries: Collection[str] = ()) -> Survey:
    """The survey of `output` (sentiment_ray/io/ownership.py) once it is known to hold nothing but this tool's own
    files; else OutputExistsError naming up to three foreign entries and their count."""
    if output.is_file() or (output.is_local and os.path.islink(output.path)):
        raise _file_not_ours(output, marker)
    found = survey(output, marker, legacy=legacy, own_entries=own_entries)
    if found.foreign:
        raise OutputExistsError(found.foreign_message())
    return found


def check_writable(final: Path) -> None:
    """Create and remove a file where the output will appear (its nearest existing folder: nothing is created
    for a check that may fail), so that an unwritable location is found before the work, not after it."""
    folder = next(p for p in (final.parent, *final.parent.parents) if p.exists() or p.is_symlink())
    if not folder.is_dir():
        raise OutputNotWritableError(f"output {final}: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{final.name}.write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputNotWritableError(f"output {final}: cannot write in {folder} ({reason}); "
                                     "choose a writable location") from None


def _warn_of_leftovers(final: Path) -> None:
    # An old output is moved aside for a moment while a new one replaces it (commit); a run killed in that
    # moment leaves it there. Say so, rather than let it sit unseen under a hidden name.
    for leftover in sorted(final.parent.glob(f".{glob.escape(final.name)}.old-*")):
        logger.warning("%s holds the output that an interrupted run was replacing with %s; delete it when it "
                       "is not needed", leftover, final)


def resolve_output(path: str | Path) -> Path:
    """The absolute output path, refused when it is an object-store URI, the home folder or a filesystem root."""
    _refuse_uri(path)
    final = Path(path).expanduser().resolve()
    _refuse_protected(final)
    return final


def check_output_free(path: str | Path, overwrite: bool, marker: str, flag: str = "--overwrite",
                      own_entries: Collection[str] = (), legacy: Legacy = ()) -> Path:
    """The resolved output path, once it is known to be writable and either free or replaceable: absent, an
    empty folder, or (with `overwrite`) a folder holding only what the command's `marker` lists (`legacy`: the
    names the command writes, for a marker of a release that kept no list). `own_entries` are names the command
    itself wrote there before this check (evaluate's `scored/`); they count as neither."""
    final = resolve_output(path)
    found = own_output(location(final), marker, legacy, own_entries)
    if found.holds_output and not overwrite:
        raise OutputExistsError(f"output {final} already exists; choose a new path or pass {flag} to replace it")
    check_writable(final)
    _warn_of_leftovers(final)
    return final


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path], role: str) -> None:
    """Refuse, whatever the flags, an output that is the home folder or a filesystem root, or that is, contains
    or lies inside one of `inputs` (files, folders or globs; object-store URIs cannot overlap a local output):
    replacing it would destroy the input."""
    if is_uri(output) and not str(output).startswith("file://"):
        _refuse_overlap_in_store(str(output), inputs, role)
        return
    final = Path(location(output).path)
    _refuse_protected(final)
    for given in inputs:
        for path in _input_paths(str(given)):
            _refuse_related(final, path, final, path, role)
        if pattern_could_match(str(given), str(final)):
            raise OutputExistsError(f"output {final} is matched by the {role} pattern {given!r}: a rerun or "
                                    "--resume would read it as input; choose an output the pattern does not match")


def _refuse_related(output: PurePath, given: PurePath, output_shown: object, given_shown: object, role: str) -> None:
    if output == given:
        where = "is"
    elif output.is_relative_to(given):
        where = "lies inside"
    elif given.is_relative_to(output):
        where = "contains"
    else:
        return
    raise OutputExistsError(f"output {output_shown} {where} the {role} {given_shown}; choose an output outside the "
                            "inputs")


def _refuse_overlap_in_store(output: str, inputs: Iterable[str | Path], role: str) -> None:
    """An object-store output and the inputs in the same store (scheme), compared by bucket and key without
    contacting the store; a local input cannot overlap it."""
    _refuse_bucket_root(output)
    scheme = output.split("://", 1)[0]
    path = PurePosixPath(uri_path(output))
    for given in map(str, inputs):
        if is_uri(given) and given.split("://", 1)[0] == scheme:
            source = PurePosixPath(uri_path(given))
            _refuse_related(path, source, f"{scheme}://{path}", f"{scheme}://{source}", role)


# ------------------------------------------------------------------------------------------ object-store outputs


def _refuse_bucket_root(output: str) -> None:
    """A bucket root (s3://bucket) takes the place of a filesystem root: never an output, whatever the flags."""
    path = uri_path(output)
    if "/" not in path:
        raise OutputExistsError(f"output {output.split('://', 1)[0]}://{path} is a bucket root; choose a folder "
                                "inside it")


def _check_writable_in_store(output: Location) -> None:
    """Write and delete an empty object beside the output: a missing bucket, wrong credentials or endpoint, or
    a write-protected prefix are found before the work, not after it."""
    probe = output.parent.join(f".{output.name}.write-check-{uuid.uuid4().hex[:8]}")
    try:
        probe.write_bytes(b"")
        probe.delete(missing_ok=True)
    except (StorageError, OSError) as exc:
        raise OutputNotWritableError(f"output {output}: cannot write in {output.parent} ({exc}); choose a writable "
                                     "location") from None


def check_output_location_free(path: str | Path, overwrite: bool, marker: str, flag: str = "--overwrite",
                               own_entries: Collection[str] = (), legacy: Legacy = ()) -> Location:
    """check_output_free for a local path or an object-store URI: the same rules, the same messages. An
    object-store output that an interrupted upload left unfinished counts as this tool's."""
    output = location(path)
    if output.is_local:
        return location(check_output_free(output.path, overwrite, marker, flag, own_entries, legacy))
    _refuse_bucket_root(output.uri)
    found = own_output(output, marker, legacy, own_entries)
    if found.holds_output and not overwrite:
        unfinished = UPLOAD_MARKER in found.own
        raise OutputExistsError(f"output {output} " + ("holds an unfinished upload of an earlier run" if unfinished
                                                       else "already exists")
                                + f"; choose a new path or pass {flag} to replace it")
    _check_writable_in_store(output)
    return output


def upload_output(staging: Path, final: Location, overwrite: bool, marker: str,
                  own_entries: Collection[str] = (), legacy: Legacy = ()) -> Location:
    """commit() for an object-store output: the finished local folder `staging` is uploaded to `final`.

    The rules are checked again (the output may have changed during the run). An earlier output (only with
    `overwrite`; `own_entries` are kept) is deleted, exactly the files its records list, its marker first, so
    that no reader takes old metadata for new weights; then every file is uploaded, the marker last.
    UPLOAD_MARKER is there from the first change to the last, listing the old and the new files: an interrupted
    upload is recognisable as this tool's, and as unfinished, and a rerun deletes no more than those. On
    failure the result is kept in `staging` and the message says so."""
    try:
        found = own_output(final, marker, legacy, own_entries)
    except OutputExistsError as exc:
        raise OutputExistsError(f"{exc}; this run's result is kept in {staging}") from None
    if found.holds_output and not overwrite:
        raise OutputExistsError(f"output {final} appeared while this run was writing; result kept in {staging}")
    new_files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    unfinished = final.join(UPLOAD_MARKER)
    try:
        unfinished.write_bytes((json.dumps({FILES_KEY: sorted({*found.own, *new_files} - {UPLOAD_MARKER})}, indent=2)
                                + "\n").encode())
        found.own = [p for p in found.own if p != UPLOAD_MARKER]
        delete_own(found, first=(marker,))
        upload_folder(staging, final, last=(marker,))
        unfinished.delete()
    except StoreWriteError as exc:  # the store refused an object it took at the start: the environment's, exit 1
        raise OutputWriteError(f"could not write {exc.uri}: {exc.reason}; this run's result is kept in {staging}, "
                               f"and {final} is unfinished: rerun with --overwrite or upload the folder by "
                               "hand") from exc
    except (StorageError, OSError) as exc:
        raise OSError(f"could not upload {staging} to {final} ({exc}); this run's result is kept in {staging}, and "
                      f"{final} is unfinished: rerun with --overwrite or upload the folder by hand") from exc
    return final


def _input_paths(given: str) -> list[Path]:
    if "://" in given and not given.startswith("file://"):
        return []
    return [Path(m).resolve() for m in input_matches(given)]  # what the reading takes the input to be


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"


def commit(staging: Path, final: Path, overwrite: bool, marker: str, legacy: Legacy = (),
           keep: Collection[str] = ()) -> Path:
    """Move a finished staging folder to its final name. An old output there is replaced only with `overwrite`
    and only while it is still this tool's alone (checked again: it may have changed during the run): it is
    moved aside, the new one renamed in, and then exactly the files its records list are deleted. `keep`: names
    in the old output that belong to the new one (evaluate's `scored/`, scored by this run or read by it); they
    move into the new output. Every failure names the paths; none is silent."""
    kept = [name for name in keep if os.path.lexists(final / name)]
    for name in kept:
        (final / name).rename(staging / name)
    try:
        return _swap(staging, final, overwrite, marker, legacy)
    except BaseException:
        for name in kept:  # back where the user had them
            if os.path.lexists(staging / name) and not os.path.lexists(final / name):
                final.mkdir(parents=True, exist_ok=True)
                (staging / name).rename(final / name)
        raise


def _swap(staging: Path, final: Path, overwrite: bool, marker: str, legacy: Legacy) -> Path:
    if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        final.rmdir()  # an empty folder holds nothing to keep
    if not os.path.lexists(final):
        staging.rename(final)
        return final
    try:
        found = own_output(location(final), marker, legacy)
    except OutputExistsError as exc:
        raise OutputExistsError(f"{exc}; this run's result is kept in {staging}") from None
    if not overwrite:
        raise OutputExistsError(f"output {final} appeared while this run was writing; result kept in {staging}")
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        final.rename(old)
    except OSError as exc:
        raise OSError(f"could not move the old output {final} aside ({exc}); this run's result is kept in "
                      f"{staging}") from exc
    try:
        staging.rename(final)
    except OSError as exc:
        old.rename(final)  # the old output back under its name: the user keeps what they had
        raise OSError(f"could not rename {staging} to {final} ({exc}); the old output is back in place and this "
                      "run's result is kept in the former") from exc
    _delete_old(old, final, found)
    return final


def _delete_old(old: Path, final: Path, found: Survey) -> None:
    """Delete the old output, moved aside to `old`: exactly the files its survey found to be the tool's. An
    entry that appeared between the survey and the move stays there, with a warning."""
    try:
        delete_own(dataclasses.replace(found, folder=location(old)))
        old.rmdir()
    except OSError as exc:
        logger.warning("replaced %s, but could not delete the old output, now at %s (%s); delete it by hand",
                       final, old, exc)
