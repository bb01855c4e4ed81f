"""Exactly once under failure: resume after a driver crash, an actor killed mid-unit, bad rows, bad files.

Every check compares against an uninterrupted run of the same inputs: rows in == rows out, no duplicate id,
and the scores of rows scored twice (before and after a crash) are identical.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray import scoring
from sentiment_ray.config import ScoreConfig, load_config
from sentiment_ray.data import InputError
from sentiment_ray.faults import EXIT_AFTER_BATCHES, FAIL_TEXT, MARKER
from sentiment_ray.outputs import OutputExistsError
from sentiment_ray.scoring import MANIFEST_FILE, UNITS_DIR, run_scoring
from sentiment_ray.tiny_model import synthetic_reviews
from tests.conftest import REPO_ROOT, write_reviews

pytestmark = pytest.mark.timeout(300)
ROWS_PER_FILE = 600


def _config(adapter, input_path, output, *extra):
    return load_config(ScoreConfig, REPO_ROOT / "configs" / "score" / "tiny_test.yaml", [
        f"adapter={adapter}", f"input={input_path}", f"output={output}", "model.dtype=float32", "unit_rows=256",
        *extra,
    ])


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recovery-reviews")
    texts, _ = synthetic_reviews(3 * ROWS_PER_FILE, seed=9)
    for part in range(3):
        rows = slice(part * ROWS_PER_FILE, (part + 1) * ROWS_PER_FILE)
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows.start, rows.stop)], "text": texts[rows]}),
                       folder / f"part-{part}.parquet", row_group_size=200)
    return folder


@pytest.fixture(scope="module")
def reference(ray_session, random_adapter, reviews, tmp_path_factory):
    """The uninterrupted run: id -> score."""
    out = tmp_path_factory.mktemp("reference") / "scored"
    run_scoring(_config(random_adapter, reviews, out))
    return {r["id"]: r["score"] for r in pq.read_table(out, columns=["id", "score"]).to_pylist()}


def _assert_same_as_reference(out, reference):
    table = pq.read_table(out, columns=["id", "score", "status"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(reference) and len(set(ids)) == len(ids)  # rows in == rows out, no duplicate
    assert dict(zip(ids, table.column("score").to_pylist())) == reference  # identical, not merely close
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_resume_scores_only_the_missing_units_and_matches_an_uninterrupted_run(
        ray_session, random_adapter, reviews, reference, tmp_path, monkeypatch):
    out = tmp_path / "scored"
    work = tmp_path / ".scored.partial"

    def driver_dies_before_commit(*args, **kwargs):
        raise KeyboardInterrupt("driver gone")

    monkeypatch.setattr(scoring, "_commit", driver_dies_before_commit)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(_config(random_adapter, reviews, out))
    monkeypatch.undo()
    committed = sorted((work / UNITS_DIR).glob("*.parquet"))
    units = json.loads((work / scoring.PLAN_FILE).read_text())["units"]
    assert not out.exists() and len(committed) == len(units) == 9  # row groups of 200 rows, units of <= 256
    for lost in committed[::2]:  # as if the driver had died with these units still in flight
        lost.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in committed[1::2]}

    with pytest.raises(OutputExistsError, match="--resume"):
        run_scoring(_config(random_adapter, reviews, out))
    with pytest.raises(OutputExistsError, match="other batch|other adapter|other keep_columns"):
        run_scoring(_config(random_adapter, reviews, out, "resume=true", "keep_columns=[text]"))
    summary = run_scoring(_config(random_adapter, reviews, out, "resume=true"))

    _assert_same_as_reference(out, reference)
    assert summary["units"]["committed_before_this_run"] == 4 and summary["units"]["scored_this_run"] == 5
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_scored"] == 1800
    assert not work.exists() and len(kept) == 4


def test_an_actor_killed_mid_unit_is_restarted_and_the_run_completes_exactly_once(
        ray_session, random_adapter, reviews, reference, tmp_path, monkeypatch):
    marker = tmp_path / "actor-died"
    monkeypatch.setenv(EXIT_AFTER_BATCHES, "3")  # in the middle of an actor's first unit (4 batches per unit)
    monkeypatch.setenv(MARKER, str(marker))
    out = tmp_path / "scored"
    summary = run_scoring(_config(random_adapter, reviews, out))
    assert marker.exists()  # an actor really died (os._exit), and Ray restarted it and retried its unit
    _assert_same_as_reference(out, reference)
    assert summary["rows_out"] == 1800


def _score_command(adapter, reviews, out, *extra):
    return [sys.executable, "-m", "sentiment_ray.cli", "score", "--config",
            str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "--adapter", str(adapter), "--input",
            str(reviews), "--output", str(out), "model.dtype=float32", "unit_rows=256", "ray.address=local",
            "ray.num_cpus=3", *extra]


@pytest.mark.timeout(420)
def test_driver_killed_then_resumed_gives_every_row_once_with_identical_scores(
        random_adapter, reviews, reference, tmp_path):
    """The real thing: the `score` command in its own process (with its own Ray) is SIGKILLed after a few units
    are committed, then rerun with --resume."""
    out, work = tmp_path / "scored", tmp_path / ".scored.partial"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="sr-kill-", dir="/tmp"), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_score_command(random_adapter, reviews, out), env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
        deadline = time.time() + 180
        while len(list((work / UNITS_DIR).glob("*.parquet"))) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no unit committed within 180 s"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, with no cleanup
        first.wait(timeout=30)
    committed_at_kill = len(list((work / UNITS_DIR).glob("*.parquet")))
    assert not out.exists() and 3 <= committed_at_kill < 9

    refused = subprocess.run(_score_command(random_adapter, reviews, out), env=env, capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=120, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(_score_command(random_adapter, reviews, out, "--resume"), env=env, capture_output=True,
                             text=True, cwd=REPO_ROOT, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _assert_same_as_reference(out, reference)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["units"]["committed_before_this_run"] >= committed_at_kill
    assert manifest["rows_in"] == manifest["rows_out"] == 1800


def test_bad_rows_are_marked_and_the_job_goes_on(ray_session, random_adapter, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    long_review = "a dull and tedious film. " * 4000 + "but the ending is wonderful"  # 100,000 characters
    assert len(long_review) == 100_027
    texts = ["great film", None, "", "   ", long_review, "this row POISON raises", "awful"]
    write_reviews(folder / "strings.parquet", texts, ids=[f"s{i}" for i in range(len(texts))])
    pq.write_table(pa.table({"id": ["n0", "n1"], "text": [3, 4]}), folder / "numbers.parquet")
    monkeypatch.setenv(FAIL_TEXT, "POISON")  # any batch holding this row raises, every time it is tried
    out = tmp_path / "scored"
    summary = run_scoring(_config(random_adapter, folder, out))
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 9
    assert {k: rows[k]["status"] for k in rows} == {
        "s0": "ok", "s1": "empty_text", "s2": "empty_text", "s3": "empty_text", "s4": "ok", "s5": "error",
        "s6": "ok", "n0": "non_string_text", "n1": "non_string_text"}
    assert rows["s4"]["truncated"] is True and 0.0 <= rows["s4"]["score"] <= 1.0  # head_tail policy, scored
    assert "InjectedFault" in rows["s5"]["error"] and rows["s5"]["score"] is None
    assert rows["s6"]["error"] is None and rows["s6"]["label"] in ("negative", "positive")
    assert rows["n0"]["score"] is None and rows["n0"]["label"] is None
    assert (summary["rows_in"], summary["rows_out"], summary["rows_scored"], summary["rows_marked"],
            summary["rows_skipped"]) == (9, 9, 3, 6, 0)
    assert summary["status_counts"] == {"ok": 3, "empty_text": 3, "error": 1, "non_string_text": 2}


def test_inputs_without_an_id_column_get_stable_derived_ids(ray_session, random_adapter, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["good", "bad", "fine"]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": ["meh"]}), folder / "sub" / "b.parquet")
    first = run_scoring(_config(random_adapter, folder, tmp_path / "one"))
    run_scoring(_config(random_adapter, folder, tmp_path / "two"))
    ids = pq.read_table(tmp_path / "one").column("id").to_pylist()
    assert ids == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "sub/b.parquet:0"]
    assert pq.read_table(tmp_path / "two").column("id").to_pylist() == ids
    assert first["ids"].startswith("derived")


def test_unreadable_files_fail_the_job_or_are_skipped_and_reported(ray_session, random_adapter, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_reviews(folder / "good.parquet", ["fine", "nice"], ids=["a", "b"])
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not a parquet footer")
    # a file whose footer reads but whose data pages are garbage: found only when its unit is read
    texts, _ = synthetic_reviews(50, seed=2)
    damaged = write_reviews(folder / "damaged.parquet", texts, ids=[f"d{i}" for i in range(50)])
    data = bytearray(damaged.read_bytes())
    data[8:400] = os.urandom(392)
    damaged.write_bytes(bytes(data))

    with pytest.raises(InputError, match=r"broken\.parquet: not a readable Parquet file"):
        run_scoring(_config(random_adapter, folder, tmp_path / "strict"))
    (folder / "broken.parquet").rename(tmp_path / "broken.parquet")
    with pytest.raises(InputError, match=r"damaged\.parquet rows 0-49: unreadable"):
        run_scoring(_config(random_adapter, folder, tmp_path / "strict"))
    (tmp_path / "broken.parquet").rename(folder / "broken.parquet")

    out = tmp_path / "lenient"
    summary = run_scoring(_config(random_adapter, folder, out, "skip_unreadable_files=true", "overwrite=true"))
    assert pq.read_table(out).column("id").to_pylist() == ["a", "b"]
    assert [f["file"] for f in summary["files_skipped"]] == [str(folder / "broken.parquet")]
    assert [(u["file"], u["rows"]) for u in summary["units_skipped"]] == [(str(damaged), 50)]
    assert (summary["rows_in"], summary["rows_out"], summary["rows_skipped"]) == (52, 2, 50)
    assert json.loads((out / MANIFEST_FILE).read_text())["files_skipped"][0]["error"].startswith(str(folder))
