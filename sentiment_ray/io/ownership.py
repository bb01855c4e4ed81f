"""What at an output this tool wrote, by its own records: the only things `--overwrite` may delete.

Every command that writes a folder records the files it wrote there (relative paths) in its commit marker, under
FILES_KEY: the score manifest, the adapter's `sentiment_ray.json`, evaluate's `metrics.json`. An entry of an
output is the tool's when

- that list names it (a file), or it is a folder holding such files;
- the output holds no list yet, but a record of an unfinished run (score's plan, the hidden marker of an
  interrupted upload) or a marker of a release that kept no list, and the entry's path is one that the command
  writes (`legacy`: fragment names, plot names, the adapter's files);
- it is hidden work of the tool, matched by its exact name: the temporary file of an atomic write
  (`.<one of the names above>.tmp-<8 hex>`, storage.Location.write_with) or the upload marker.

Anything else, of any name (dot-names too), at any depth, on a local disk or an object store, makes the output
not the tool's alone: every command refuses it, whatever the flags, before any work starts. Nothing here
deletes an entry that is not the tool's, and a folder holding only dot-files is not empty.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from sentiment_ray.io.storage import Location, StorageError, location

logger = logging.getLogger(__name__)

FILES_KEY = "files_written"  # in a commit marker: every file the run wrote, relative to the output
UPLOAD_MARKER = ".sentiment_ray_upload"  # in an object-store output while it is being uploaded
EXAMPLES_SHOWN = 3  # entries named in a refusal; the count says how many there are
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{8}$")  # storage.Location.write_with's temporary file


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the output, `/`-separated
    is_dir: bool


@dataclass
class Survey:
    """What an output holds, sorted into the tool's own files and the entries of someone else."""

    folder: Location
    marker: str
    own: list[str] = field(default_factory=list)  # files the tool wrote (and its hidden work), relative paths
    own_dirs: list[str] = field(default_factory=list)  # folders holding only such files
    foreign: list[str] = field(default_factory=list)  # entries of someone else; folders shown with a trailing /
    recorded: bool = False  # a marker or a record of an unfinished run is there: an output of this tool
    hidden: set[str] = field(default_factory=set)  # of `own`: hidden work (temporary files, the upload marker)

    @property
    def holds_output(self) -> bool:
        """The tool's output is there (more than hidden work files that a killed write left)."""
        return any(path not in self.hidden for path in self.own)

    def describe_foreign(self) -> str:
        count = len(self.foreign)
        return (f"{count} entr{'y' if count == 1 else 'ies'} not written by sentiment-ray, e.g. "
                f"{', '.join(self.foreign[:EXAMPLES_SHOWN])}")

    def foreign_message(self, shown_marker: str | None = None) -> str:
        """The one line that refuses this output (OutputExistsError's text)."""
        if self.recorded:
            return (f"output {self.folder} holds {self.describe_foreign()}, beside the earlier output of "
                    f"sentiment-ray; move {'it' if len(self.foreign) == 1 else 'them'} out or choose another path "
                    f"(--overwrite deletes only the files that {self.marker} lists)")
        return (f"output {self.folder} holds {self.describe_foreign()}; choose another path (--overwrite replaces "
                f"only a folder holding {shown_marker or self.marker} or an empty folder)")


def children(folder: Location, relative: str = "") -> list[Entry]:
    """The entries directly in `folder/relative`, sorted; [] when it is absent. A local symlink is an entry of
    its own, never followed (what it points to is not the output's)."""
    if folder.is_local:
        try:
            with os.scandir(Path(folder.path) / relative) as scan:
                found = [Entry(f"{relative}/{item.name}" if relative else item.name, item.is_dir(follow_symlinks=False))
                         for item in scan]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(found, key=lambda e: e.path)
    base = folder.join(relative) if relative else folder
    selector = pafs.FileSelector(base.path, recursive=False, allow_not_found=True)
    try:
        infos = folder.filesystem.get_file_info(selector)
    except OSError as exc:
        raise StorageError(f"{base}: could not list ({' '.join(str(exc).split())})") from None
    prefix = folder.path.rstrip("/") + "/"
    return sorted((Entry(info.path[len(prefix):], info.type == pafs.FileType.Directory) for info in infos
                   if info.path.startswith(prefix)), key=lambda e: e.path)


def walk(folder: Location, descend: Callable[[str], bool] = lambda _: True) -> list[Entry]:
    """Every entry below `folder`, sorted by path, entering only the folders that `descend` accepts."""
    entries, pending = [], [""]
    while pending:
        for entry in children(folder, pending.pop()):
            entries.append(entry)
            if entry.is_dir and descend(entry.path):
                pending.append(entry.path)
    return sorted(entries, key=lambda e: e.path)


def listed_files(marker: Location) -> set[str] | None:
    """The files a marker records (FILES_KEY), or None when it records none (an earlier release's marker, or
    one that is not this tool's JSON)."""
    try:
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    files = data.get(FILES_KEY) if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def survey(folder: str | Location, marker: str, *, legacy: Callable[[str], bool] | Collection[str] = (),
           anchors: Collection[str] = (), own_entries: Collection[str] = ()) -> Survey:
    """Sort what `folder` holds into the tool's files and foreign entries (the module's doc).

    `marker`: the command's commit marker, listing its files; `anchors`: other records that make the folder the
    tool's before the marker is there (score's plan); `legacy`: the relative paths the command writes, trusted
    only where a marker or anchor without a list is there; `own_entries`: top-level names another rule governs
    (evaluate's `scored/`, a score output of its own), left out of the survey."""
    folder = location(folder)
    is_legacy = legacy if callable(legacy) else frozenset(legacy).__contains__

    def known(path: str) -> bool:
        return path == marker or path in anchors or is_legacy(path)

    top = {e.path for e in children(folder) if not e.is_dir}
    listed: set[str] = set()
    by_name = False
    for record in (marker, UPLOAD_MARKER):
        if record in top:
            files = listed_files(folder.join(record))
            if files is None:
                by_name = True
            else:
                listed |= files
    recorded = bool(top & {marker, UPLOAD_MARKER, *anchors})
    if recorded and not top & {marker, UPLOAD_MARKER}:
        by_name = True  # an unfinished run's anchor: its files are known by their names until the marker lists them
    listed_dirs = {parent for path in listed for parent in _parents(path)}

    def descend(path: str) -> bool:
        # A folder that no record can vouch for is named as a whole: a user's tree is not walked file by file.
        return path.split("/", 1)[0] not in own_entries and (by_name or path in listed_dirs)

    entries = [e for e in walk(folder, descend) if e.path.split("/", 1)[0] not in own_entries]

    def hidden(path: str) -> bool:
        if "/" in path:
            return False
        if path == UPLOAD_MARKER:
            return True
        temporary = _TEMPORARY.match(path)
        return bool(temporary) and (temporary["name"] in listed or known(temporary["name"]))

    result = Survey(folder, marker, recorded=recorded)
    for entry in entries:
        if entry.is_dir:
            continue
        if hidden(entry.path):
            result.hidden.add(entry.path)
            result.own.append(entry.path)
        elif entry.path in listed or entry.path in (marker, *anchors) or (by_name and known(entry.path)):
            result.own.append(entry.path)
    holding = {parent for path in result.own for parent in _parents(path)}
    own = set(result.own)
    for entry in entries:
        if entry.path in own or (entry.is_dir and entry.path in holding):
            if entry.is_dir:
                result.own_dirs.append(entry.path)
            continue
        if any(entry.path.startswith(shown.rstrip("/") + "/") for shown in result.foreign if shown.endswith("/")):
            continue  # inside a foreign folder, which is named instead
        result.foreign.append(entry.path + ("/" if entry.is_dir else ""))
    return result


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def delete_own(found: Survey, first: Iterable[str] = (), last: Iterable[str] = ()) -> None:
    """Delete exactly the tool's files of a survey (then the folders that held only them): `first` before the
    others (the marker, so that no reader takes a half-deleted output as finished), `last` after them (the
    record that keeps the output recognisable as the tool's until the end, score's plan)."""
    first, last = [p for p in first if p in found.own], [p for p in last if p in found.own]
    middle = [p for p in found.own if p not in first and p not in last]
    for path in (*first, *middle, *last):
        found.folder.join(path).delete(missing_ok=True)
    if found.folder.is_local:
        for path in sorted(found.own_dirs, key=lambda p: -p.count("/")):
            try:
                os.rmdir(Path(found.folder.path) / path)
            except OSError:
                logger.debug("kept %s: not empty", found.folder.join(path))


def record_files(folder: Path, marker: str, extra: Iterable[str] = (), sort_keys: bool = False) -> list[str]:
    """Write into `folder/marker` (a JSON object) the list of every file below the local `folder`, the marker
    included, plus `extra` (files of this run that join it at the commit); returns the list."""
    files = sorted({*(e.path for e in walk(location(folder)) if not e.is_dir), marker, *extra})
    path = Path(folder) / marker
    data = json.loads(path.read_text())
    data[FILES_KEY] = files
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
    return files
