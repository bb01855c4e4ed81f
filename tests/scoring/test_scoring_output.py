"""The scoring output folder: what a run may do with what is there, and which fragments make a unit whole."""

from pathlib import Path

import pytest

from sentiment_ray.io.outputs import OutputExistsError, OutputNotWritableError
from sentiment_ray.scoring.output import (
    MANIFEST_FILE,
    PLAN_FILE,
    Fragment,
    OutputState,
    UnitCommits,
    UnitProgress,
    fragment_name,
    fragments_by_unit,
    open_score_output,
    tile,
    unit_progress,
)
from sentiment_ray.scoring.work_units import WorkUnit
from tests.conftest import foreign_folder

PART = fragment_name(0, 0, 10)


def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fresh_and_empty_outputs_start_a_run(tmp_path):
    assert open_score_output(str(tmp_path / "out"), overwrite=False, resume=False).state is OutputState.FRESH
    (tmp_path / "empty").mkdir()
    assert open_score_output(str(tmp_path / "empty"), overwrite=False, resume=False).state is OutputState.FRESH
    assert open_score_output(str(tmp_path / "new"), overwrite=False, resume=True).state is OutputState.FRESH
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # opening writes nothing


def test_an_unfinished_run_is_continued_only_with_resume_and_dropped_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / PLAN_FILE).write_text("{}")
    (out / PART).write_text("x")
    with pytest.raises(OutputExistsError, match="stopped before finishing .*; pass --resume to continue it or "
                                                "--overwrite to start over"):
        open_score_output(str(out), overwrite=False, resume=False)
    assert open_score_output(str(out), overwrite=False, resume=True).state is OutputState.UNFINISHED
    assert _contents(out) == {PLAN_FILE: b"{}", PART: b"x"}
    assert open_score_output(str(out), overwrite=True, resume=False).state is OutputState.FRESH
    assert not out.exists() or not list(out.iterdir())  # --overwrite starts over


def test_a_finished_output_is_checked_with_resume_and_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / PART).write_text("x")
    (out / MANIFEST_FILE).write_text("{}")
    with pytest.raises(OutputExistsError, match="already exists; pass --resume to check it .* or --overwrite"):
        open_score_output(str(out), overwrite=False, resume=False)
    assert open_score_output(str(out), overwrite=False, resume=True).state is OutputState.FINISHED
    with pytest.raises(OutputExistsError, match="not both"):
        open_score_output(str(out), overwrite=True, resume=True)
    assert open_score_output(str(out), overwrite=True, resume=False).state is OutputState.FRESH
    assert not out.exists() or not list(out.iterdir())


def test_resume_if_exists_resumes_what_an_earlier_run_left_and_starts_where_it_left_nothing(tmp_path):
    def state(out):
        return open_score_output(str(out), overwrite=False, resume=False, resume_if_exists=True).state

    assert state(tmp_path / "new") is OutputState.FRESH
    (tmp_path / "empty").mkdir()
    assert state(tmp_path / "empty") is OutputState.FRESH
    # Killed while writing its plan: only the hidden temporary file of that write is there. A retry starts
    # afresh; --resume, which says there is an earlier run to continue, refuses.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / f".{PLAN_FILE}.tmp-0123abcd").write_text("{")
    assert state(killed) is OutputState.FRESH
    with pytest.raises(OutputExistsError, match="there is nothing to resume"):
        open_score_output(str(killed), overwrite=False, resume=True)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / PLAN_FILE).write_text("{}")
    (unfinished / PART).write_text("x")
    assert state(unfinished) is OutputState.UNFINISHED
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / PART).write_text("x")
    (finished / MANIFEST_FILE).write_text("{}")
    assert state(finished) is OutputState.FINISHED
    # Fragments with neither plan nor manifest: no record of the tool vouches for them, so they count as
    # someone else's, whatever the flags.
    orphans = tmp_path / "orphans"
    orphans.mkdir()
    (orphans / PART).write_text("x")
    for flags in (dict(resume_if_exists=True), dict(overwrite=True)):
        with pytest.raises(OutputExistsError, match=rf"holds 1 entry not written by sentiment-ray, e\.g\. {PART}; "):
            open_score_output(str(orphans), **{"overwrite": False, "resume": False, **flags})
    assert _contents(orphans) == {PART: b"x"}
    with pytest.raises(OutputExistsError, match="not both"):
        open_score_output(str(finished), overwrite=True, resume=False, resume_if_exists=True)
    assert _contents(unfinished) == {PLAN_FILE: b"{}", PART: b"x"}  # opening changes nothing
    assert _contents(finished) == {PART: b"x", MANIFEST_FILE: b"{}"}


@pytest.mark.parametrize("flags", [dict(overwrite=True, resume=False), dict(overwrite=False, resume=True),
                                   dict(overwrite=False, resume=False),
                                   dict(overwrite=False, resume=False, resume_if_exists=True)])
def test_a_folder_of_other_things_is_refused_whatever_the_flags(tmp_path, flags):
    out = foreign_folder(tmp_path / "out")
    before = _contents(out)
    with pytest.raises(OutputExistsError, match=rf"^output {out} holds 3 entries not written by sentiment-ray, "
                                                r"e\.g\. csv/, notes\.txt, thesis\.pdf; choose another path"):
        open_score_output(str(out), **flags)
    assert _contents(out) == before


def test_a_file_home_and_roots_are_never_outputs(tmp_path, monkeypatch):
    path = tmp_path / "reviews.parquet"
    path.write_bytes(b"PAR1 user data")
    home = tmp_path / "me"
    home.mkdir()
    (home / MANIFEST_FILE).write_text("{}")  # even a home that looks like an output of this tool
    monkeypatch.setenv("HOME", str(home))
    for output, message in ((path, f"output {path} is a file not written by sentiment-ray"),
                            (home, f"output {home} is your home directory"), ("~", f"output {home} is your home"),
                            ("/", "output / is a filesystem root")):
        for overwrite in (True, False):
            with pytest.raises(OutputExistsError, match=f"^{message}"):
                open_score_output(str(output), overwrite=overwrite, resume=not overwrite)
    assert path.read_bytes() == b"PAR1 user data" and (home / MANIFEST_FILE).exists()


def test_an_unwritable_location_is_found_before_the_work(tmp_path):
    with pytest.raises(OutputNotWritableError, match=r"^output /proc/sr-out: cannot write in /proc"):
        open_score_output("/proc/sr-out", overwrite=False, resume=False)


def test_fragment_names_sort_in_input_order_and_parse_back():
    names = [fragment_name(1, 0, 5), fragment_name(0, 10, 20), fragment_name(0, 2, 10), fragment_name(10, 0, 1)]
    assert [Fragment.parse(n) for n in sorted(names)] == [Fragment(0, 2, 10), Fragment(0, 10, 20), Fragment(1, 0, 5),
                                                          Fragment(10, 0, 1)]
    assert Fragment.parse("part-00000.parquet") is None and Fragment.parse(MANIFEST_FILE) is None


def test_a_unit_is_whole_only_when_its_fragments_tile_it_exactly_once():
    unit = WorkUnit(3, "/in/c.parquet", "c.parquet", 100, 200)
    whole = [Fragment(3, 100, 150), Fragment(3, 150, 200)]
    assert tile(unit, whole) == whole
    assert tile(unit, [Fragment(3, 100, 150)]) is None  # a gap: rows 150-199 missing
    assert tile(unit, [Fragment(3, 100, 150), Fragment(4, 150, 200)]) is None  # another file's rows
    # A write retried with other block boundaries left overlapping fragments: one exact tiling is chosen, and
    # only through fragments that fit together (here the long first one leads nowhere).
    retried = [Fragment(3, 100, 160), Fragment(3, 100, 120), Fragment(3, 120, 150), Fragment(3, 150, 200)]
    assert tile(unit, retried) == [Fragment(3, 100, 120), Fragment(3, 120, 150), Fragment(3, 150, 200)]
    assert tile(unit, [Fragment(3, 100, 200), Fragment(3, 100, 150)]) == [Fragment(3, 100, 200)]


def test_a_resume_scores_only_the_gaps_between_kept_fragments():
    unit = WorkUnit(3, "/in/c.parquet", "c.parquet", 100, 300)
    assert unit_progress(unit, []) == UnitProgress((), ((100, 300),), ())
    whole = [Fragment(3, 100, 200), Fragment(3, 200, 300)]
    assert unit_progress(unit, whole) == UnitProgress(tuple(whole), (), ())
    # Rows 100-149 and 200-249 committed before the crash: only the rest is scored again.
    assert unit_progress(unit, [Fragment(3, 200, 250), Fragment(3, 100, 150)]) == UnitProgress(
        (Fragment(3, 100, 150), Fragment(3, 200, 250)), ((150, 200), (250, 300)), ())
    # Overlapping leftovers of a retried write: a chain of disjoint fragments is kept, the rest deleted, and the
    # gaps plus the kept fragments hold every row of the unit exactly once.
    progress = unit_progress(unit, [Fragment(3, 100, 160), Fragment(3, 100, 120), Fragment(3, 150, 200),
                                    Fragment(3, 120, 140), Fragment(4, 100, 300)])
    assert progress.kept == (Fragment(3, 100, 160),)
    assert progress.gaps == ((160, 300),)
    assert set(progress.stale) == {Fragment(3, 100, 120), Fragment(3, 150, 200), Fragment(3, 120, 140)}
    # An exact tiling, when one exists, wins over the greedy chain (which would leave a gap).
    exact = unit_progress(unit, [Fragment(3, 100, 160), Fragment(3, 100, 150), Fragment(3, 150, 300)])
    assert (exact.kept, exact.gaps, exact.stale) == ((Fragment(3, 100, 150), Fragment(3, 150, 300)), (),
                                                     (Fragment(3, 100, 160),))


def test_fragments_are_grouped_by_the_unit_whose_rows_they_hold():
    units = [WorkUnit(0, "/a", "a", 0, 100), WorkUnit(0, "/a", "a", 100, 200), WorkUnit(2, "/c", "c", 0, 50)]
    fragments = [Fragment(2, 0, 50), Fragment(0, 150, 200), Fragment(0, 0, 100), Fragment(0, 100, 150),
                 Fragment(1, 0, 10), Fragment(0, 50, 150)]  # the last spans two units: a unit of neither
    assert fragments_by_unit(units, fragments) == [
        [Fragment(0, 0, 100)], [Fragment(0, 100, 150), Fragment(0, 150, 200)], [Fragment(2, 0, 50)]]


def test_a_unit_counts_as_committed_once_when_this_run_has_written_all_its_rows():
    # Unit 0 had all its rows to score; unit 1 (a resume) only rows 150-200 and 250-300.
    commits = UnitCommits({0: [WorkUnit(0, "/a", "a", 0, 100)],
                           1: [WorkUnit(0, "/a", "a", 150, 200), WorkUnit(0, "/a", "a", 250, 300)]})
    assert commits.add(0, Fragment(0, 0, 60)) is False
    assert commits.add(1, Fragment(0, 250, 300)) is False  # one of its two gaps
    assert commits.add(0, Fragment(0, 60, 100)) is True
    assert commits.add(0, Fragment(0, 60, 100)) is False  # a retried write task writes it again: counted once
    assert commits.add(1, Fragment(0, 150, 180)) is False
    assert commits.add(1, Fragment(0, 160, 200)) is False  # retried with other block boundaries: no tiling yet
    assert commits.add(1, Fragment(0, 180, 200)) is True
    assert commits.add(7, Fragment(1, 0, 10)) is False  # not a unit of this run
