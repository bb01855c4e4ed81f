"""Exactly once under failure: resume after a driver crash, an actor killed mid-unit, bad rows, bad files.

Every check compares against an uninterrupted run of the same inputs: rows in == rows out, no duplicate id,
and the scores of rows scored twice (before and after a crash) agree (tests/conftest.py: RESCORED_TOLERANCE).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.config import ScoreConfig, load_config
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.outputs import OutputExistsError
from sentiment_ray.model.tiny import synthetic_reviews
from sentiment_ray.ops.faults import EXIT_AFTER_BATCHES, FAIL_TEXT, MARKER, SLOW_BATCH_SECONDS
from sentiment_ray.scoring import MANIFEST_FILE, PLAN_FILE, job, run_scoring
from sentiment_ray.scoring.output import Fragment, tile
from sentiment_ray.scoring.plan import ScorePlan
from tests.conftest import REPO_ROOT, assert_same_rows, on_the_session_ray, write_reviews

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


def _fragments(out) -> list:
    return [f for f in map(Fragment.parse, (p.name for p in out.glob("part-*.parquet"))) if f is not None]


def _complete_units(out) -> list:
    """The plan's units whose rows the fragments in `out` hold exactly once."""
    plan = ScorePlan.from_json((out / PLAN_FILE).read_text())
    fragments = _fragments(out)
    return [u for u in plan.units if tile(u, fragments) is not None]


def _keep_only_rows(out, unit, start, stop) -> None:
    """Replace the unit's fragments by one fragment of its rows [start, stop), as the sink would have written it."""
    from sentiment_ray.scoring.sink import COUNTS_KEY, fragment_counts

    own = [f for f in _fragments(out) if f.file_index == unit.file_index and unit.start <= f.start < unit.stop]
    rows = pa.concat_tables([pq.read_table(out / f.name) for f in sorted(own, key=lambda f: f.start)])
    for fragment in own:
        (out / fragment.name).unlink()
    part = rows.slice(start - unit.start, stop - start)
    part = part.replace_schema_metadata({COUNTS_KEY: json.dumps(fragment_counts(part)).encode()})
    pq.write_table(part, out / Fragment(unit.file_index, start, stop).name)


def _assert_same_as_reference(out, reference):
    table = pq.read_table(out, columns=["id", "score", "status"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(reference) and len(set(ids)) == len(ids)  # rows in == rows out, no duplicate
    assert_same_rows(dict(zip(ids, table.column("score").to_pylist())), reference)
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_resume_scores_only_the_rows_no_fragment_holds_and_matches_an_uninterrupted_run(
        ray_session, random_adapter, reviews, reference, tmp_path, monkeypatch):
    out = tmp_path / "scored"

    def driver_dies_before_commit(*args, **kwargs):
        raise KeyboardInterrupt("driver gone")

    monkeypatch.setattr(job, "check_committed", driver_dies_before_commit)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(_config(random_adapter, reviews, out))
    monkeypatch.undo()
    units = ScorePlan.from_json((out / PLAN_FILE).read_text()).units
    assert not (out / MANIFEST_FILE).exists()  # no manifest: the folder reads as unfinished
    assert len(_complete_units(out)) == len(units) == 9  # row groups of 200 rows, units of <= 256
    lost_units = units[::2]
    for fragment in _fragments(out):  # as if the driver had died with these units still in flight
        if any(u.file_index == fragment.file_index and u.start <= fragment.start < u.stop for u in lost_units):
            (out / fragment.name).unlink()
    # And one unit only half written: the sink had committed its first rows when the driver died.
    half_unit = units[1]
    middle = half_unit.start + 2 * 64  # a block boundary (batch_size 64): the sink writes whole blocks
    _keep_only_rows(out, half_unit, half_unit.start, middle)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    with pytest.raises(OutputExistsError, match="--resume"):
        run_scoring(_config(random_adapter, reviews, out))
    with pytest.raises(OutputExistsError, match="other batch|other adapter|other keep_columns"):
        run_scoring(_config(random_adapter, reviews, out, "resume=true", "keep_columns=[text]"))
    summary = run_scoring(_config(random_adapter, reviews, out, "resume=true"))

    _assert_same_as_reference(out, reference)
    assert summary.units.committed_before_this_run == 3 and summary.units.scored_this_run == 6
    assert summary.rows_in == summary.rows_out == summary.rows_scored == 1800
    # Only the rows no fragment held were scored again: the lost units and the second half of the half unit.
    assert summary.rows_scored_this_run == sum(u.rows for u in lost_units) + (half_unit.stop - middle)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # the kept units were not rewritten


def test_an_actor_killed_mid_unit_is_restarted_and_the_run_completes_exactly_once(
        ray_session, random_adapter, reviews, reference, tmp_path, monkeypatch):
    marker = tmp_path / "actor-died"
    monkeypatch.setenv(EXIT_AFTER_BATCHES, "3")  # in the middle of an actor's first unit (4 batches per unit)
    monkeypatch.setenv(MARKER, str(marker))
    out = tmp_path / "scored"
    summary = run_scoring(_config(random_adapter, reviews, out))
    assert marker.exists()  # an actor really died (os._exit), and Ray restarted it and retried its unit
    _assert_same_as_reference(out, reference)
    assert summary.rows_out == 1800


def _score_command(adapter, reviews, out, *extra, address="local"):
    return [sys.executable, "-m", "sentiment_ray.cli", "score", "--config",
            str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "--adapter", str(adapter), "--input",
            str(reviews), "--output", str(out), "model.dtype=float32", "unit_rows=256", f"ray.address={address}",
            *(["ray.num_cpus=3"] if address == "local" else []), *extra]  # a Ray joined has its CPUs


def _score_in_process(adapter, reviews, out, *extra) -> int:
    """`_score_command`'s command run by this process's CLI (on the session's Ray), with its exit code."""
    from sentiment_ray.cli import main

    return main(_score_command(adapter, reviews, out, *extra)[3:])


@pytest.mark.timeout(420)
def test_driver_killed_then_resumed_gives_every_row_once_with_the_same_scores(
        ray_session, random_adapter, reviews, reference, tmp_path, capsys):
    """The real thing: the `score` command in its own process (a driver of the session's Ray, as on a cluster) is
    SIGKILLed after a few units are committed, then rerun with --resume."""
    out = tmp_path / "scored"
    env, address = on_the_session_ray(ray_session)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_score_command(random_adapter, reviews, out, address=address), env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
        deadline = time.time() + 180
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no unit committed within 180 s"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver, with no cleanup; Ray ends the actors of its job
        first.wait(timeout=30)
    committed_at_kill = len(_complete_units(out))
    assert not (out / MANIFEST_FILE).exists() and committed_at_kill < 9

    # The rerun and the resume by this process's CLI, on the same Ray: what they do does not depend on which
    # process drives them.
    capsys.readouterr()
    assert _score_in_process(random_adapter, reviews, out) == 2 and "--resume" in capsys.readouterr().err
    assert _score_in_process(random_adapter, reviews, out, "--resume") == 0, capsys.readouterr().err[-3000:]
    _assert_same_as_reference(out, reference)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["units"]["committed_before_this_run"] >= committed_at_kill
    assert manifest["rows_in"] == manifest["rows_out"] == 1800


def test_bad_rows_are_marked_and_the_job_goes_on(ray_session, random_adapter, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    long_review = "a dull and tedious film. " * 4000 + "but the ending is wonderful"  # 100,000 characters
    assert len(long_review) == 100_027
    texts = ["great film", None, "", "   ", long_review, "this row POISON raises", "awful", b"bad \xff",
             b"\xc3\x28 broken", "très bien"]
    raw = [t.encode() if isinstance(t, str) else t for t in texts]
    # a string column holding invalid UTF-8 bytes, as Parquet files written by other tools can
    write_reviews(folder / "strings.parquet", pa.array(raw, pa.binary()).view(pa.string()),
                  ids=[f"s{i}" for i in range(len(texts))])
    write_reviews(folder / "binary.parquet", pa.array([b"great film", b"bad \xfe", None], pa.binary()),
                  ids=["b0", "b1", "b2"])
    pq.write_table(pa.table({"id": ["n0", "n1"], "text": [3, 4]}), folder / "numbers.parquet")
    monkeypatch.setenv(FAIL_TEXT, "POISON")  # any batch holding this row raises, every time it is tried
    out = tmp_path / "scored"
    summary = run_scoring(_config(random_adapter, folder, out))
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 15
    assert {k: rows[k]["status"] for k in rows} == {
        "s0": "ok", "s1": "empty_text", "s2": "empty_text", "s3": "empty_text", "s4": "ok", "s5": "error",
        "s6": "ok", "s7": "invalid_utf8", "s8": "invalid_utf8", "s9": "ok",
        "b0": "ok", "b1": "invalid_utf8", "b2": "empty_text", "n0": "non_string_text", "n1": "non_string_text"}
    assert rows["s4"]["truncated"] is True and 0.0 <= rows["s4"]["score"] <= 1.0  # head_tail policy, scored
    assert "InjectedFault" in rows["s5"]["error"] and rows["s5"]["score"] is None
    assert rows["s6"]["error"] is None and rows["s6"]["label"] in ("negative", "positive")
    assert rows["n0"]["score"] is None and rows["n0"]["label"] is None
    assert {k: (rows[k]["error"], rows[k]["score"], rows[k]["label"]) for k in ("s7", "s8", "b1")} == {
        "s7": ("invalid UTF-8 byte 0xff at byte 4", None, None),
        "s8": ("invalid UTF-8 byte 0xc3 at byte 0", None, None),
        "b1": ("invalid UTF-8 byte 0xfe at byte 4", None, None)}
    assert rows["b0"]["score"] == rows["s0"]["score"]  # a binary text column is UTF-8 text like a string one
    assert (summary.rows_in, summary.rows_out, summary.rows_scored, summary.rows_marked,
            summary.rows_skipped) == (15, 15, 5, 10, 0)
    assert summary.status_counts == {"ok": 5, "empty_text": 4, "error": 1, "invalid_utf8": 3, "non_string_text": 2}

    # The text column kept in the output, its invalid bytes included: copied byte for byte, readable.
    kept = tmp_path / "kept"
    run_scoring(_config(random_adapter, folder / "strings.parquet", kept, "keep_columns=[text]"))
    table = pq.read_table(kept)
    assert table.column_names[:2] == ["id", "text"] and table.schema.field("text").type == pa.string()
    assert table.column("id").to_pylist() == [f"s{i}" for i in range(len(texts))]
    assert table.column("text").cast(pa.binary()).to_pylist() == raw
    assert {i: (st, sc) for i, st, sc in zip(table.column("id").to_pylist(), table.column("status").to_pylist(),
                                             table.column("score").to_pylist())} == {
        k: (rows[k]["status"], rows[k]["score"]) for k in rows if k.startswith("s")}


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
    assert first.ids.startswith("derived")


def _without_harness_logging_errors(console: str) -> str:
    """In-process runs under pytest: a logging handler set up by an earlier test may still hold a capture stream
    pytest has closed, and the report logging prints of that ("--- Logging error ---", a traceback, the record)
    is the harness's, not the job's."""
    return re.sub(r"--- Logging error ---.*?Arguments: \(.*?\)\n", "", console, flags=re.S)


def test_unreadable_files_fail_the_job_or_are_skipped_and_reported(ray_session, random_adapter, tmp_path, capfd):
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
    capfd.readouterr()
    with pytest.raises(InputError, match=r"damaged\.parquet rows 0-49: unreadable") as failed:
        run_scoring(_config(random_adapter, folder, tmp_path / "strict"))
    # The failed pipeline's actors are gone although the error (and its traceback) is still held: their CPUs are
    # free for the next run, which once waited forever for them.
    deadline = time.time() + 15  # the raylet frees a dead actor's resources a moment after its process ends
    while ray_session.available_resources().get("CPU") != 3 and time.time() < deadline:
        time.sleep(0.2)
    assert failed.value is not None and ray_session.available_resources().get("CPU") == 3
    console = capfd.readouterr().err  # the command reports the error in one line; Ray Data's log has the rest
    console = _without_harness_logging_errors(console)
    assert "Traceback" not in console and "Full stack trace" not in console, console[-3000:]
    (tmp_path / "broken.parquet").rename(folder / "broken.parquet")

    out = tmp_path / "lenient"
    summary = run_scoring(_config(random_adapter, folder, out, "skip_unreadable_files=true", "overwrite=true"))
    assert pq.read_table(out).column("id").to_pylist() == ["a", "b"]
    assert [f["file"] for f in summary.files_skipped] == [str(folder / "broken.parquet")]
    assert [(u["file"], u["rows"]) for u in summary.units_skipped] == [(str(damaged), 50)]
    assert (summary.rows_in, summary.rows_out, summary.rows_skipped) == (52, 2, 50)
    assert json.loads((out / MANIFEST_FILE).read_text())["files_skipped"][0]["error"].startswith(str(folder))


def test_attempts_that_kill_the_actor_are_counted_per_driver_run(ray_session):
    """A batch is started again within one run only after the actor scoring it died; the ledger that counts the
    starts is the run's own, so a killed driver's attempts never count against a batch."""
    from types import SimpleNamespace

    import ray

    from sentiment_ray.scoring.stages import BATCH_ATTEMPTS, ScoreStage, run_ledger

    first_run = run_ledger("first-run")
    for _ in range(BATCH_ATTEMPTS):  # the actor died mid-batch each time: starts pile up within the run
        ray.get(first_run.begin.remote((0, 200)))
    batch = pa.table({"__unit": pa.array([0, 0], pa.int32()), "__row": pa.array([200, 201], pa.int64())})
    stage = SimpleNamespace(ledger=first_run, files=["/data/in.parquet"], unit_files={0: 0})
    with pytest.raises(InputError, match=r"^/data/in\.parquet rows 200-201: 4 attempts in this run ended with the "
                                         "scoring process dying"):
        ScoreStage.__call__(stage, batch)
    assert ray.get(run_ledger("second-run").begin.remote((0, 200))) == 1  # a rerun starts counting afresh


def test_resume_of_a_finished_output_checks_that_the_inputs_still_match(ray_session, random_adapter, tmp_path):
    from sentiment_ray.io.outputs import OutputExistsError

    folder = tmp_path / "in"
    folder.mkdir()
    write_reviews(folder / "a.parquet", ["good", "bad", "fine"], ids=["a0", "a1", "a2"])
    out = tmp_path / "scored"
    run_scoring(_config(random_adapter, folder, out))
    again = run_scoring(_config(random_adapter, folder, out, "resume=true"))
    assert again.rows_out == 3 and again.output == str(out)

    write_reviews(folder / "a.parquet", ["good", "bad", "fine", "new"], ids=["a0", "a1", "a2", "a3"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="is complete, but it was scored from other inputs"):
        run_scoring(_config(random_adapter, folder, out, "resume=true"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused, nothing touched


def _as_a_terminal_starts_a_foreground_command() -> None:
    """SIGINT at its default and not blocked, whatever this test process inherited: an ignored SIGINT is inherited
    across exec, and the command then never sees the Ctrl-C (in whole-suite runs under xdist this test saw its
    command finish with exit 0 after the signal, every time; alone it passed)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.timeout(300)
def test_ctrl_c_ends_score_with_one_line_exit_130_and_the_work_can_be_resumed(ray_session, random_adapter, reviews,
                                                                           reference, tmp_path, capsys):
    out = tmp_path / "scored"
    env, address = on_the_session_ray(ray_session)
    # 36 batches of 0.4 s on one actor: the run lasts ~13 s past its first fragment, so that Ctrl-C lands mid-run
    # however late this busy machine lets the loop below see that fragment (unslowed, the rest took 4 s: a run
    # once finished before the signal arrived; with 9 s left it failed once, in a run of three test processes).
    env[SLOW_BATCH_SECONDS] = "0.4"
    process = subprocess.Popen(_score_command(random_adapter, reviews, out, address=address), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               cwd=REPO_ROOT, preexec_fn=_as_a_terminal_starts_a_foreground_command)
    deadline = time.time() + 180
    while not list(out.glob("part-*.parquet")):
        assert process.poll() is None and time.time() < deadline, "no unit committed within 180 s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    _, err = process.communicate(timeout=120)
    masks = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(("SigBlk",
                                                                                                      "SigIgn"))]
    assert process.returncode == 130, f"{err[-3000:]}\nthis process: SIGINT {signal.getsignal(signal.SIGINT)}, {masks}"
    ours = [line for line in err.splitlines() if line.startswith("sentiment-ray ")]
    assert ours == ["sentiment-ray score: interrupted; the work units committed so far are kept: rerun the same "
                    "command with --resume to continue"]
    assert "Traceback" not in err and not (out / MANIFEST_FILE).exists()
    assert _score_in_process(random_adapter, reviews, out, "--resume") == 0, capsys.readouterr().err[-3000:]
    _assert_same_as_reference(out, reference)


def _printed_json(stdout: str) -> dict:
    """The command's JSON result from its stdout, where Ray may have printed lines of its own (a raylet warning
    about worker processes, forwarded worker output) before or after it."""
    found = re.search(r"^\{$.*?^\}$", stdout, re.M | re.S)
    assert found, f"no JSON object in the command's output: {stdout[-500:]!r}"
    return json.loads(found.group(0))


def test_a_job_run_again_with_resume_if_exists_finishes_the_first_runs_work(ray_session, random_adapter, tmp_path,
                                                                            monkeypatch, capsys):
    """What a retried RayJob does: the same `score` command line, run again after the first run died, finishes
    that run's work; run once more on the finished output, it reports it; with other settings, it is refused."""
    from sentiment_ray.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    texts, _ = synthetic_reviews(400, seed=4)
    for part in range(2):
        write_reviews(folder / f"part-{part}.parquet", texts[part * 200:(part + 1) * 200],
                      ids=[f"p{part}-{i}" for i in range(200)])
    out = tmp_path / "scored"
    command = ["score", "--config", str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "--adapter",
               str(random_adapter), "--input", str(folder), "--output", str(out), "--resume-if-exists",
               "model.dtype=float32", "unit_rows=64"]

    def driver_gets_sigterm_before_commit(*args, **kwargs):  # what KubeRay and `ray job stop` send
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the CLI's handler raises in this frame at once
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(job, "check_committed", driver_gets_sigterm_before_commit)
    assert main(command) == 143  # the first run: nothing there yet, so it starts; then its driver is stopped
    monkeypatch.undo()
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("sentiment-ray ")] == [
        "sentiment-ray score: terminated (SIGTERM); the work units committed so far are kept: rerun the same "
        "command with --resume to continue"]
    assert signal.getsignal(signal.SIGTERM) is not None and "sentiment_ray" not in repr(signal.getsignal(
        signal.SIGTERM))  # the CLI put back the handler it found
    first = {r["id"]: r["score"] for r in pq.read_table(out, columns=["id", "score"]).to_pylist()}
    assert len(first) == 400 and not (out / MANIFEST_FILE).exists()
    units = ScorePlan.from_json((out / PLAN_FILE).read_text()).units
    assert [(u.file_index, u.start, u.stop) for u in units] == [
        (file, start, min(start + 64, 200)) for file in (0, 1) for start in (0, 64, 128, 192)]
    for fragment in _fragments(out):  # as if the driver had died with the first file's units in flight
        if fragment.file_index == 0:
            (out / fragment.name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    capsys.readouterr()

    assert main(command) == 0  # the retry: the same command line
    summary = _printed_json(capsys.readouterr().out)
    assert (summary["units"]["committed_before_this_run"], summary["units"]["scored_this_run"]) == (4, 4)
    assert summary["rows_scored_this_run"] == 200 and summary["rows_out"] == summary["rows_in"] == 400
    table = pq.read_table(out, columns=["id", "score"])
    assert_same_rows(dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist())), first)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # the second file was not rescored

    finished = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(command) == 0  # once more, on the finished output: reported, nothing scored or rewritten
    again = _printed_json(capsys.readouterr().out)
    assert (again["rows_out"], again["units"]["scored_this_run"]) == (400, 4)  # the manifest's, as written
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished

    assert main([*command, "--keep-columns", "text"]) == 2  # other settings: never overwritten silently
    assert "is complete, but it was scored from other keep_columns" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished


def test_a_full_disk_stops_score_with_one_line_exit_1_and_resume_finishes_it(ray_session, random_adapter, reviews,
                                                                             reference, tmp_path, monkeypatch,
                                                                             capsys):
    """The disk fills after 3 fragments (a write raises ENOSPC inside a Ray Data write task): one line naming the
    file and the error, exit 1, no manifest and no half-written file; `--resume` with space back finishes it."""
    from sentiment_ray.cli import main
    from sentiment_ray.ops.faults import DISK_FULL_AFTER_FRAGMENTS

    out = tmp_path / "scored"
    command = ["score", "--config", str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "--adapter",
               str(random_adapter), "--input", str(reviews), "--output", str(out), "model.dtype=float32",
               "unit_rows=256"]
    monkeypatch.setenv(DISK_FULL_AFTER_FRAGMENTS, "3")
    assert main(command) == 1
    err = _without_harness_logging_errors(capsys.readouterr().err)
    ours = [line for line in err.splitlines() if line.startswith("sentiment-ray ")]
    assert len(ours) == 1 and re.fullmatch(
        rf"sentiment-ray score: error: could not write {out}/part-\d+-\d+-\d+\.parquet: \[Errno 28\] No space left "
        r"on device \(injected: \w+\); the work units committed so far are kept: rerun the same command with "
        "--resume to continue", ours[0]), ours
    assert "Traceback" not in err
    assert (out / PLAN_FILE).exists() and not (out / MANIFEST_FILE).exists()  # unfinished, so resumable
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert 3 <= len(_fragments(out)) < 9

    monkeypatch.delenv(DISK_FULL_AFTER_FRAGMENTS)  # space is back
    assert main([*command, "--resume"]) == 0
    _assert_same_as_reference(out, reference)
