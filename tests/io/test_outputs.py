import json
import logging
import re
from pathlib import Path

import pytest

from sentiment_ray.io import outputs
from sentiment_ray.io.outputs import (
    OutputExistsError,
    OutputNotWritableError,
    check_output_free,
    check_writable,
    commit,
    refuse_overlap,
)
from sentiment_ray.io.ownership import FILES_KEY
from tests.conftest import foreign_folder

MARKER = "_done.json"


def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_output_of_this_tool(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_text("x")
    (out / MARKER).write_text(json.dumps({FILES_KEY: [MARKER, "part-00000.parquet"]}))
    assert check_output_free(out, overwrite=True, marker=MARKER) == out
    with pytest.raises(OutputExistsError, match=rf"output {out} already exists; choose a new path or pass --overwrite"):
        check_output_free(out, overwrite=False, marker=MARKER)


def test_a_marker_that_lists_no_files_vouches_only_for_the_names_the_command_writes(tmp_path):
    """An output of a release that kept no list: its files are the tool's only by their known names."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_text("x")
    (out / MARKER).write_text("{}")
    assert check_output_free(out, overwrite=True, marker=MARKER, legacy={"part-00000.parquet"}) == out
    with pytest.raises(OutputExistsError, match=rf"^output {out} holds 1 entry not written by sentiment-ray, e\.g\. "
                                                r"part-00000\.parquet, beside the earlier output of sentiment-ray; "
                                                rf"move it out or choose another path \(--overwrite deletes only the "
                                                rf"files that {MARKER} lists\)$"):
        check_output_free(out, overwrite=True, marker=MARKER)


@pytest.mark.parametrize("extra", ["NOTES.md", ".env", "plots/roc.png", "empty/", ".git/config"])
def test_anything_beside_the_listed_files_is_refused_whatever_the_flags(tmp_path, extra):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({FILES_KEY: [MARKER]}))
    (out / extra).parent.mkdir(parents=True, exist_ok=True)
    if extra.endswith("/"):
        (out / extra).mkdir()
    else:
        (out / extra).write_text("mine")
    before = _contents(out)
    shown = extra.split("/")[0] + ("/" if "/" in extra else "")
    for overwrite in (True, False):
        with pytest.raises(OutputExistsError, match=rf"holds 1 entry not written by sentiment-ray, e\.g\. "
                                                    rf"{re.escape(shown)}, beside"):
            check_output_free(out, overwrite=overwrite, marker=MARKER)
    assert _contents(out) == before and (out / extra.rstrip("/")).exists()


def test_a_folder_holding_only_dot_files_is_not_empty(tmp_path):
    out = tmp_path / "out"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: main")
    (out / ".env").write_text("TOKEN=secret")
    before = _contents(out)
    for overwrite in (True, False):
        with pytest.raises(OutputExistsError, match=rf"^output {out} holds 2 entries not written by sentiment-ray, "
                                                    r"e\.g\. \.env, \.git/; choose another path"):
            check_output_free(out, overwrite=overwrite, marker=MARKER)
    assert _contents(out) == before


@pytest.mark.parametrize("flags", [dict(overwrite=True, resume=False), dict(overwrite=False, resume=True),
                                   dict(overwrite=False, resume=False)])
def test_a_folder_of_other_things_is_refused_whatever_the_flags(tmp_path, flags):
    out = foreign_folder(tmp_path / "out")
    before = _contents(out)
    message = (rf"^output {out} holds 3 entries not written by sentiment-ray, e\.g\. csv/, notes\.txt, thesis\.pdf; "
               rf"choose another path \(--overwrite replaces only a folder holding {MARKER} or an empty folder\)$")
    with pytest.raises(OutputExistsError, match=message):
        check_output_free(out, overwrite=flags["overwrite"], marker=MARKER)
    assert _contents(out) == before


def test_a_file_is_never_an_output(tmp_path):
    path = tmp_path / "reviews.parquet"
    path.write_bytes(b"PAR1 user data")
    for overwrite in (True, False):
        with pytest.raises(OutputExistsError, match=rf"^output {path} is a file not written by sentiment-ray"):
            check_output_free(path, overwrite=overwrite, marker=MARKER)
    assert path.read_bytes() == b"PAR1 user data"


def test_an_empty_folder_may_be_used_without_a_flag(tmp_path):
    (tmp_path / "out").mkdir()
    assert check_output_free(tmp_path / "out", overwrite=False, marker=MARKER) == tmp_path / "out"


def test_own_entries_count_as_nothing_there(tmp_path):
    out = tmp_path / "eval"
    (out / "scored").mkdir(parents=True)
    (out / "scored" / "part-00000.parquet").write_text("x")
    assert check_output_free(out, overwrite=False, marker=MARKER, own_entries=("scored",)) == out
    with pytest.raises(OutputExistsError, match=r"holds 1 entry not written by sentiment-ray, e\.g\. scored/"):
        check_output_free(out, overwrite=True, marker=MARKER)


def test_home_and_roots_are_refused_whatever_the_flags(tmp_path, monkeypatch):
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    (home / MARKER).write_text("{}")  # even a folder that looks like an output of this tool
    monkeypatch.setenv("HOME", str(home))
    for path, message in ((home, f"output {home} is your home directory; choose a folder inside it"),
                          ("~", f"output {home} is your home directory"),
                          (tmp_path / "users", f"output {tmp_path / 'users'} contains your home directory {home}"),
                          ("/", "output / is a filesystem root")):
        with pytest.raises(OutputExistsError, match=f"^{message}"):
            check_output_free(path, overwrite=True, marker=MARKER)
    assert check_output_free(home / "scored", overwrite=False, marker=MARKER) == home / "scored"


def test_an_output_overlapping_an_input_is_refused(tmp_path):
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    (reviews / "a.parquet").write_text("x")
    single = reviews / "a.parquet"
    cases = [
        (single, [single], f"output {single} is the score input {single}"),
        (reviews, [reviews], f"output {reviews} is the score input {reviews}"),
        (reviews / "scored", [reviews], f"output {reviews / 'scored'} lies inside the score input {reviews}"),
        (tmp_path, [single], f"output {tmp_path} contains the score input {single}"),
        (reviews, [str(reviews / "*.parquet")], f"output {reviews} contains the score input {single}"),
        (reviews, [f"file://{single}"], f"output {reviews} contains the score input {single}"),
    ]
    for output, inputs, message in cases:
        with pytest.raises(OutputExistsError, match=f"^{message}; choose an output outside the inputs$"):
            refuse_overlap(output, inputs, "score input")
    refuse_overlap(tmp_path / "scored", [reviews, str(reviews / "*.parquet")], "score input")  # siblings: fine
    refuse_overlap(reviews / "scored", [str(reviews / "*.parquet")], "score input")  # beside the glob's files
    refuse_overlap(tmp_path, ["s3://bucket/reviews"], "score input")  # an object store cannot overlap a path


def test_an_unwritable_location_is_found_before_the_work(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutputNotWritableError, match=rf"output {tmp_path}/notes\.txt/out/scored: "
                                                     rf"{tmp_path}/notes\.txt is a file, not a folder"):
        check_output_free(tmp_path / "notes.txt" / "out" / "scored", overwrite=False, marker=MARKER)
    # /proc takes no new files, not even from root
    with pytest.raises(OutputNotWritableError, match=r"^output /proc/sr-out: cannot write in /proc \(.+\); "
                                                     "choose a writable location$"):
        check_output_free("/proc/sr-out", overwrite=False, marker=MARKER)
    assert issubclass(OutputNotWritableError, FileExistsError)  # the CLI reports it as a user error (exit 2)
    check_writable(tmp_path / "new" / "deeper" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the check created nothing


def test_commit_replaces_an_output_of_this_tool_and_leaves_nothing_behind(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / MARKER).write_text("old")
    staging = tmp_path / ".out.tmp-1"
    staging.mkdir()
    (staging / MARKER).write_text("new")
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        commit(staging, final, overwrite=False, marker=MARKER)
    commit(staging, final, overwrite=True, marker=MARKER)
    assert (final / MARKER).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden .out.old-* left


def test_commit_checks_again_what_it_replaces(tmp_path):
    final = foreign_folder(tmp_path / "out")  # the user filled the folder while the run was working
    before = _contents(final)
    staging = tmp_path / ".out.tmp-1"
    staging.mkdir()
    (staging / MARKER).write_text("new")
    with pytest.raises(OutputExistsError, match=rf"holds 3 entries not written by sentiment-ray.*; this run's "
                                                rf"result is kept in {staging}$"):
        commit(staging, final, overwrite=True, marker=MARKER)
    assert _contents(final) == before and (staging / MARKER).read_text() == "new"


def test_commit_puts_the_old_output_back_when_the_new_one_cannot_be_moved_in(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / MARKER).write_text("old")
    with pytest.raises(OSError, match="the old output is back in place"):
        commit(tmp_path / ".out.tmp-gone", final, overwrite=True, marker=MARKER)
    assert (final / MARKER).read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_commit_reports_an_old_output_it_could_not_delete(tmp_path, monkeypatch, caplog):
    final = tmp_path / "out"
    final.mkdir()
    (final / MARKER).write_text("old")
    staging = tmp_path / ".out.tmp-1"
    staging.mkdir()

    def refuses(found, *args, **kwargs):
        raise PermissionError(13, "Permission denied", found.folder.path)

    monkeypatch.setattr(outputs, "delete_own", refuses)
    with caplog.at_level(logging.WARNING, logger="sentiment_ray.io.outputs"):
        commit(staging, final, overwrite=True, marker=MARKER)
    (old,) = tmp_path.glob(".out.old-*")
    assert caplog.messages == [f"replaced {final}, but could not delete the old output, now at {old} "
                               f"([Errno 13] Permission denied: '{old}'); delete it by hand"]
    # and the next run into that output says it is still there
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sentiment_ray.io.outputs"):
        check_output_free(final, overwrite=True, marker=MARKER)
    assert caplog.messages == [f"{old} holds the output that an interrupted run was replacing with {final}; delete it "
                               "when it is not needed"]


