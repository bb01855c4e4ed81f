"""The output folder of a scoring run, on a local disk or an object store, and what may be done with it.

While a run goes, the folder holds its plan (`_sentiment_ray_plan.json`) and the fragments the sink has
committed: `part-<file>-<first row>-<end row>.parquet`, one object per contiguous run of a work unit's rows, each
written whole or not at all (a rename on a local disk, one upload on an object store). The manifest
(`_sentiment_ray_manifest.json`) is written last, once every unit's rows are there exactly once: **the manifest is
the commit marker**, and a folder without one is unfinished. Names starting with `_` or `.` are skipped by
pyarrow, Ray Data, pandas and DuckDB, so any of them reads the folder as it is, in input order by file name.

What may be done with an existing folder (the rules of sentiment_ray/io/outputs.py, on any storage):
- absent or empty: a fresh run;
- holding the manifest (a finished run): `--resume` checks it against this run's plan and leaves it as it is;
  `--overwrite` replaces it;
- holding a plan but no manifest (an unfinished run): `--resume` continues it; `--overwrite` starts over;
- `--resume-if-exists`, for a job that may be run again with the same arguments (a retried RayJob): `--resume`
  where an earlier run left its plan or manifest, a fresh run where it left nothing (as `--resume` does too);
  the settings are checked as with `--resume`, so a changed input or setting is still refused;
- holding anything else, beside these or instead of them: refused whatever the flags; it was not written by
  this tool. What is the tool's is decided by its records (sentiment_ray/io/ownership.py): a finished run's manifest
  lists every file of the run (`files_written`); an unfinished run's plan vouches for the names a run writes
  (fragments, skipped-unit records), as does a manifest of a release that kept no list. `--overwrite` deletes
  exactly those files (the manifest first, the plan last), nothing else.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from sentiment_ray.io.outputs import (
    OutputExistsError,
    OutputNotWritableError,
    check_writable,
    resolve_output,
)
from sentiment_ray.io.ownership import Survey, delete_own, survey
from sentiment_ray.io.storage import Location, location
from sentiment_ray.scoring.work_units import WorkUnit

PLAN_FILE = "_sentiment_ray_plan.json"
MANIFEST_FILE = "_sentiment_ray_manifest.json"
SKIPPED_PREFIX = "_sentiment_ray_skipped-"  # + unit name + ".json": a unit that could not be read (flag set)
FRAGMENT_PATTERN = re.compile(r"^part-(\d{5})-(\d{12})-(\d{12})\.parquet$")
_SKIPPED_PATTERN = re.compile(rf"^{re.escape(SKIPPED_PREFIX)}.+\.json$")
_WRITE_CHECK_PATTERN = re.compile(r"^_sentiment_ray_write_check-[0-9a-f]{8}$")  # _check_writable's probe


def is_score_file(path: str) -> bool:
    """A name that a scoring run writes into its output (all at the top level): what an unfinished run's plan,
    or a manifest that lists no files (an earlier release's), vouches for."""
    return "/" not in path and (path in (PLAN_FILE, MANIFEST_FILE) or any(
        p.match(path) for p in (FRAGMENT_PATTERN, _SKIPPED_PATTERN, _WRITE_CHECK_PATTERN)))


def fragment_name(file_index: int, start: int, stop: int) -> str:
    """A function of the rows a fragment holds: a retried write replaces the same object, never adds one."""
    return f"part-{file_index:05d}-{start:012d}-{stop:012d}.parquet"


@dataclass(frozen=True)
class Fragment:
    file_index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return fragment_name(self.file_index, self.start, self.stop)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @classmethod
    def parse(cls, name: str) -> Fragment | None:
        found = FRAGMENT_PATTERN.match(name)
        return cls(*(int(g) for g in found.groups())) if found else None


def tile(unit: WorkUnit, fragments: list[Fragment]) -> list[Fragment] | None:
    """Fragments that cover the unit's rows exactly once, in order, or None when the rows are not all there.
    Fragments of one unit can overlap only when a write was retried with other block boundaries; any exact
    tiling is as good as another (the rows' scores are the same), so the first one found is taken.
    `fragments`: the unit's own (fragments_by_unit), or any superset."""
    starting: dict[int, list[Fragment]] = {}
    for fragment in fragments:
        if fragment.file_index == unit.file_index and unit.start <= fragment.start < fragment.stop <= unit.stop:
            starting.setdefault(fragment.start, []).append(fragment)
    route: dict[int, Fragment] = {}  # end row -> the fragment that reached it
    frontier, seen = [unit.start], {unit.start}
    while frontier:
        position = frontier.pop()
        for fragment in sorted(starting.get(position, []), key=lambda f: -f.stop):
            if fragment.stop not in seen:
                seen.add(fragment.stop)
                route[fragment.stop] = fragment
                frontier.append(fragment.stop)
    if unit.stop not in seen:
        return None
    chosen, position = [], unit.stop
    while position != unit.start:
        chosen.append(route[position])
        position = route[position].start
    return chosen[::-1]


def fragments_by_unit(units: list[WorkUnit], fragments: list[Fragment]) -> list[list[Fragment]]:
    """Each unit's fragments (those inside its rows), found by one sort and a bisection per unit rather than by
    a scan of every fragment for every unit: a 100M-row output has tens of thousands of both."""
    from bisect import bisect_left

    by_file: dict[int, list[Fragment]] = {}
    for fragment in sorted(fragments, key=lambda f: (f.file_index, f.start, f.stop)):
        by_file.setdefault(fragment.file_index, []).append(fragment)
    starts = {index: [f.start for f in group] for index, group in by_file.items()}
    grouped = []
    for unit in units:
        group = by_file.get(unit.file_index, [])
        first = bisect_left(starts.get(unit.file_index, []), unit.start)
        last = bisect_left(starts.get(unit.file_index, []), unit.stop)
        grouped.append([f for f in group[first:last] if f.stop <= unit.stop])
    return grouped


@dataclass(frozen=True)
class UnitProgress:
    """What an unfinished run left of one unit: fragments to keep (disjoint, in row order), the row ranges no
    kept fragment holds (what a resumed run scores), and fragments to delete (overlapping leftovers)."""

    kept: tuple[Fragment, ...]
    gaps: tuple[tuple[int, int], ...]
    stale: tuple[Fragment, ...]

    @property
    def complete(self) -> bool:
        return not self.gaps


def unit_progress(unit: WorkUnit, fragments: list[Fragment]) -> UnitProgress:
    """An exact tiling when the fragments hold one; else a chain of disjoint fragments from the unit's first row
    (the longest at each step) with the gaps between them. A resumed run then scores only the gaps, so every row
    the sink committed before a crash stays committed, however far the pipeline had streamed into the unit."""
    from bisect import bisect_right

    own = [f for f in fragments if f.file_index == unit.file_index and unit.start <= f.start < f.stop <= unit.stop]
    exact = tile(unit, own)
    if exact is not None:
        return UnitProgress(tuple(exact), (), tuple(f for f in own if f not in exact))
    longest: dict[int, Fragment] = {}
    for fragment in own:
        if fragment.start not in longest or fragment.stop > longest[fragment.start].stop:
            longest[fragment.start] = fragment
    starts = sorted(longest)
    kept, gaps, position = [], [], unit.start
    while position < unit.stop:
        if position in longest:
            kept.append(longest[position])
            position = longest[position].stop
            continue
        following = bisect_right(starts, position)
        gap_end = starts[following] if following < len(starts) else unit.stop
        gaps.append((position, gap_end))
        position = gap_end
    return UnitProgress(tuple(kept), tuple(gaps), tuple(f for f in own if f not in kept))


class UnitCommits:
    """Which of a run's pending units the fragments written so far complete (for the units-committed metric).

    A unit counts once, when the fragments this run wrote tile every row range it had left to score; a write
    task that Ray retried adds the same fragment again, or overlapping ones, which changes nothing here."""

    def __init__(self, left: dict[int, list[WorkUnit]]):
        self.left = {index: list(ranges) for index, ranges in left.items()}  # unit index -> row ranges to write
        self.written: dict[int, list[Fragment]] = {}

    def add(self, unit_index: int, fragment: Fragment) -> bool:
        """Record a written fragment of the unit; True when it is the one that completes the unit."""
        ranges = self.left.get(unit_index)
        if ranges is None:  # counted already
            return False
        fragments = self.written.setdefault(unit_index, [])
        fragments.append(fragment)
        if any(tile(rows, fragments) is None for rows in ranges):
            return False
        del self.left[unit_index], self.written[unit_index]
        return True


class OutputState(Enum):
    FRESH = "fresh"
    UNFINISHED = "unfinished"
    FINISHED = "finished"


@dataclass
class ScoreOutput:
    folder: Location
    state: OutputState

    @property
    def plan_file(self) -> Location:
        return self.folder.join(PLAN_FILE)

    @property
    def manifest_file(self) -> Location:
        return self.folder.join(MANIFEST_FILE)

    def fragments(self) -> list[Fragment]:
        return [f for f in (Fragment.parse(c.name) for c in self.folder.children()) if f is not None]

    def skipped_files(self) -> list[Location]:
        return [c for c in self.folder.children() if c.name.startswith(SKIPPED_PREFIX)]

    def skipped_records(self) -> list[dict]:
        return [json.loads(c.read_text()) for c in self.skipped_files()]

    def delete_fragments(self, fragments: list[Fragment]) -> None:
        for fragment in fragments:
            self.folder.join(fragment.name).delete(missing_ok=True)


def survey_score_output(folder: Location) -> Survey:
    """What `folder` holds, once it is known to hold nothing but scoring runs' files (see the module's doc)."""
    found = survey(folder, MANIFEST_FILE, legacy=is_score_file, anchors=(PLAN_FILE,))
    if found.foreign:
        raise OutputExistsError(found.foreign_message(shown_marker=f"{MANIFEST_FILE} or {PLAN_FILE},"))
    return found


def _check_writable(folder: Location) -> None:
    if folder.is_local:
        check_writable(resolve_output(folder.path))
        return
    probe = folder.join(f"_sentiment_ray_write_check-{uuid.uuid4().hex[:8]}")
    try:
        probe.write_bytes(b"")
        probe.delete(missing_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"output {folder}: cannot write there ({exc}); "
                                     "choose a writable location") from None


def open_score_output(output: str, overwrite: bool, resume: bool, resume_if_exists: bool = False,
                      before_writing: Callable[[], None] | None = None) -> ScoreOutput:
    """Decide what this run may do with `output` (see the module's doc); refusals name the flag to pass.

    `resume_if_exists` (for retried jobs): `resume` on an earlier run's output, a fresh run where there is none,
    also where a run was killed before its plan was written, leaving only a hidden temporary file.
    `before_writing`: the caller's last checks, run once this output is known to be free for a fresh run and before
    --overwrite deletes anything (not for a resume, which deletes nothing)."""
    before_writing = before_writing or (lambda: None)
    if overwrite and (resume or resume_if_exists):
        raise OutputExistsError("pass either --resume or --resume-if-exists (continue an earlier run) or "
                                "--overwrite (start over), not both")
    if resume_if_exists:
        resume = True
    if "://" not in str(output):
        resolve_output(output)  # the home folder, a filesystem root: never
    folder = location(output)
    if folder.is_file():
        raise OutputExistsError(f"output {folder} is a file not written by sentiment-ray; choose another path")
    found = survey_score_output(folder)
    finished, started = MANIFEST_FILE in found.own, PLAN_FILE in found.own
    _check_writable(folder)
    if overwrite:
        before_writing()
        # Exactly the files the records vouch for: the manifest first (no reader takes the folder as finished
        # from then on), the plan last (until then a kill leaves a recognisable unfinished output).
        delete_own(found, first=(MANIFEST_FILE,), last=(PLAN_FILE,))
        return ScoreOutput(folder, OutputState.FRESH)
    if finished:
        if resume:
            return ScoreOutput(folder, OutputState.FINISHED)
        raise OutputExistsError(f"output {folder} already exists; pass --resume to check it (a finished output is "
                                "left as it is) or --overwrite to replace it")
    if started:
        if resume:
            return ScoreOutput(folder, OutputState.UNFINISHED)
        raise OutputExistsError(f"an earlier run into {folder} stopped before finishing (its committed work is kept "
                                "there); pass --resume to continue it or --overwrite to start over")
    # Hidden names are temporary files of our own writes (storage.Location.write_with): what a kill between a
    # write and its rename leaves. A retry may start afresh beside them; a deliberate --resume names the path wrongly.
    leftovers = [c for c in folder.children() if not (resume_if_exists and c.name.startswith("."))]
    if resume and leftovers:
        raise OutputExistsError(f"output {folder} holds no {MANIFEST_FILE} or {PLAN_FILE}: there is nothing to "
                                "resume; choose a new path or pass --overwrite")
    before_writing()
    return ScoreOutput(folder, OutputState.FRESH)
