"""Scoring with its inputs, its output and its adapter on an object store (a real S3 API: the session's
moto_server, reached through the AWS_* variables as users reach theirs).

The same failures as tests/scoring/test_scoring_recovery.py on local disk: an uninterrupted run, an actor killed
mid-run, the driver dying before the commit and then --resume, bad rows, unreadable files, --overwrite of a
finished output, a folder of someone else's objects, a store that starts refusing writes mid-run. Every run
scores the same inputs (three files of reviews plus one of bad rows), so each is compared with one uninterrupted
run on local disk: every id once, and the same score, status and error for every row, exactly.
"""

import json
import os
import re
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from sentiment_ray.cli import main
from sentiment_ray.config import ScoreConfig, load_config
from sentiment_ray.io.outputs import OutputExistsError
from sentiment_ray.io.storage import location, upload_folder
from sentiment_ray.model.metadata import ADAPTER_WEIGHTS, adapter_weights_sha256
from sentiment_ray.model.tiny import synthetic_reviews
from sentiment_ray.ops.faults import EXIT_AFTER_BATCHES, FAIL_TEXT, MARKER, SLOW_BATCH_SECONDS
from sentiment_ray.scoring import MANIFEST_FILE, PLAN_FILE, ScoreManifest, job, run_scoring
from sentiment_ray.scoring.output import Fragment, tile
from sentiment_ray.scoring.plan import ScorePlan
from tests.conftest import REPO_ROOT, assert_same_rows, write_reviews

pytestmark = pytest.mark.timeout(600)
ROWS_PER_FILE = 600
REVIEW_FILES = 3
BAD_ROWS = 15
ROWS_IN = REVIEW_FILES * ROWS_PER_FILE + BAD_ROWS
UNITS = REVIEW_FILES * 3 + 3  # row groups of 200 rows, units of <= 256 rows; each file of bad rows is one unit
POISON = "POISON"  # SENTIMENT_RAY_FAULT_FAIL_TEXT in every run: the row holding it raises whenever it is scored
BAD_ROW_STATUSES = {
    "s0": "ok", "s1": "empty_text", "s2": "empty_text", "s3": "empty_text", "s4": "ok", "s5": "error",
    "s6": "ok", "s7": "invalid_utf8", "s8": "invalid_utf8", "s9": "ok",
    "b0": "ok", "b1": "invalid_utf8", "b2": "empty_text", "n0": "non_string_text", "n1": "non_string_text"}
ROWS_OK = REVIEW_FILES * ROWS_PER_FILE + 5
TINY_CONFIG = str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml")


def _config(adapter, input_path, output, *extra) -> ScoreConfig:
    return load_config(ScoreConfig, TINY_CONFIG, [
        f"adapter={adapter}", f"input={input_path}", f"output={output}", "model.dtype=float32", "unit_rows=256",
        *extra])


def _score(adapter, input_path, output, *extra, env: dict | None = None) -> ScoreManifest:
    """One run, with the bad row's fault hook (and `env`) set in the driver's environment, where the job reads
    the fault hooks to hand them to its actors."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {FAIL_TEXT: POISON, **(env or {})}.items():
            patch.setenv(key, value)
        return run_scoring(_config(adapter, input_path, output, *extra))


# A line Ray's log monitor forwards from a worker process, e.g. "\x1b[36m(MapWorker(...) pid=123)\x1b[0m ...": it
# reaches this process's stderr whenever it arrives, also from an actor of an earlier test that is still shutting
# down (seen once in CI: a scoring actor of the test before, in the stderr of a test that starts no Ray job), or
# from the session's GCS ("(pid=gcs_server) ... Failed to kill actor ...", about an actor an earlier test ended).
FORWARDED_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(.*?\bpid=[\w.-]+.*?\)")


def _cli_score(capsys, adapter, input_path, output, *flags) -> tuple[int, str]:
    """`sentiment-ray score ...` in this process: (exit code, stderr without Ray's forwarded worker lines)."""
    capsys.readouterr()
    code = main(["score", "--config", TINY_CONFIG, "--adapter", str(adapter), "--input", str(input_path),
                 "--output", str(output), *flags, "model.dtype=float32", "unit_rows=256"])
    err = capsys.readouterr().err
    # split at "\n" only: a forwarded tqdm bar ("(MapWorker ...) \rLoading weights: ...") holds "\r"s, where
    # str.splitlines would also cut, leaving pieces without the prefix that marks them
    return code, "\n".join(line for line in err.split("\n") if not FORWARDED_WORKER_LINE.match(line))


# ------------------------------------------------------------------------------------------ inputs, reference


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.create_bucket(f"sr-scoring-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def local_reviews(tmp_path_factory):
    """Three files of reviews with row groups of 200 rows, and files of every kind of bad text cell."""
    folder = tmp_path_factory.mktemp("s3-reviews")
    texts, _ = synthetic_reviews(REVIEW_FILES * ROWS_PER_FILE, seed=11)
    for part in range(REVIEW_FILES):
        rows = slice(part * ROWS_PER_FILE, (part + 1) * ROWS_PER_FILE)
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows.start, rows.stop)], "text": texts[rows]}),
                       folder / f"part-{part}.parquet", row_group_size=200)
    bad = [b"great film", None, b"", b"   ", ("a dull and tedious film. " * 4000 + "but the end is wonderful").encode(),
           f"this row {POISON} raises".encode(), b"awful", b"bad \xff", b"\xc3\x28 broken", "très bien".encode()]
    # a string column holding invalid UTF-8 bytes, as Parquet files written by other tools can
    write_reviews(folder / "strings.parquet", pa.array(bad, pa.binary()).view(pa.string()),
                  ids=[f"s{i}" for i in range(len(bad))])
    write_reviews(folder / "binary.parquet", pa.array([b"great film", b"bad \xfe", None], pa.binary()),
                  ids=["b0", "b1", "b2"])
    pq.write_table(pa.table({"id": ["n0", "n1"], "text": [3, 4]}), folder / "numbers.parquet")
    return folder


@pytest.fixture(scope="module")
def s3_reviews(bucket, local_reviews) -> str:
    uri = f"{bucket}/reviews"
    upload_folder(local_reviews, location(uri))
    return uri


@pytest.fixture(scope="module")
def s3_adapter(bucket, random_adapter) -> str:
    uri = f"{bucket}/adapters/{random_adapter.name}"
    upload_folder(random_adapter, location(uri))
    return uri


def _rows(output: str) -> dict:
    """id -> (score, status, error) of a scored output, local or on S3; fails on a duplicate id."""
    filesystem, path = pafs.FileSystem.from_uri(output) if "://" in output else (None, output)
    table = pq.read_table(path, filesystem=filesystem, columns=["id", "score", "status", "error"])
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids), "an id came out twice"
    return dict(zip(ids, zip(*(table.column(c).to_pylist() for c in ("score", "status", "error")))))


@pytest.fixture(scope="module")
def reference(ray_session, random_adapter, local_reviews, tmp_path_factory) -> dict:
    """The uninterrupted run on local disk: id -> (score, status, error)."""
    out = tmp_path_factory.mktemp("s3-reference") / "scored"
    summary = _score(random_adapter, local_reviews, out)
    assert (summary.rows_in, summary.rows_out) == (ROWS_IN, ROWS_IN)
    rows = _rows(str(out))
    assert {k: v[1] for k, v in rows.items() if not k.startswith("r")} == BAD_ROW_STATUSES
    assert {k: rows[k][2] for k in ("s7", "s8", "b1")} == {"s7": "invalid UTF-8 byte 0xff at byte 4",
                                                          "s8": "invalid UTF-8 byte 0xc3 at byte 0",
                                                          "b1": "invalid UTF-8 byte 0xfe at byte 4"}
    assert "InjectedFault" in rows["s5"][2] and rows["s5"][0] is None and rows["n0"][0] is None
    assert rows["b0"][0] == rows["s0"][0] is not None  # a binary text column is UTF-8 text like a string one
    return rows


def _fragments(output: str) -> list[Fragment]:
    return [f for f in (Fragment.parse(c.name) for c in location(output).children()) if f is not None]


def _complete_units(output: str) -> list:
    plan = ScorePlan.from_json(location(output).join(PLAN_FILE).read_text())
    fragments = _fragments(output)
    return [u for u in plan.units if tile(u, fragments) is not None]


def _objects(uri: str) -> dict[str, bytes]:
    folder = location(uri)
    return {f.relative_to(folder): f.read_bytes() for f in folder.list_files()}


# ------------------------------------------------------------------------------------------ an uninterrupted run


@pytest.fixture(scope="module")
def s3_scored(ray_session, bucket, s3_reviews, s3_adapter) -> tuple[str, ScoreManifest]:
    out = f"{bucket}/scored-{uuid.uuid4().hex[:8]}"
    return out, _score(s3_adapter, s3_reviews, out)


def test_a_run_with_input_output_and_adapter_on_s3_gives_what_a_run_on_local_disk_gives(
        s3_scored, reference, s3_reviews, s3_adapter, random_adapter):
    import ray

    from sentiment_ray.model.embedded import cache_dir

    out, summary = s3_scored
    assert (summary.rows_in, summary.rows_out, summary.rows_scored, summary.rows_marked) == (
        ROWS_IN, ROWS_IN, ROWS_OK, ROWS_IN - ROWS_OK)
    assert summary.status_counts == {"ok": ROWS_OK, "empty_text": 4, "error": 1, "invalid_utf8": 3,
                                        "non_string_text": 2}
    assert summary.output == out and summary.units.total == UNITS
    assert_same_rows(_rows(out), reference)  # every id once; statuses and errors identical to the local run

    names = sorted(c.name for c in location(out).children())
    parts = [n for n in names if n.startswith("part-")]
    # The finished output: its fragments, the manifest (the commit marker) and the plan that --resume reads.
    assert names == sorted([*parts, MANIFEST_FILE, PLAN_FILE])
    assert all(Fragment.parse(n) is not None for n in parts) and len(parts) == summary.units.fragments
    manifest = json.loads(location(out).join(MANIFEST_FILE).read_text())
    assert manifest["rows_out"] == ROWS_IN and manifest["input_files"] == [
        f"{s3_reviews}/binary.parquet", f"{s3_reviews}/numbers.parquet",
        *(f"{s3_reviews}/part-{i}.parquet" for i in range(REVIEW_FILES)), f"{s3_reviews}/strings.parquet"]

    # Readable as it is by other tools: Ray Data and pyarrow, straight from the store.
    dataset = ray.data.read_parquet(out)
    assert dataset.count() == ROWS_IN
    assert sorted(dataset.unique("id")) == sorted(reference)
    filesystem, path = pafs.FileSystem.from_uri(out)
    table = pq.read_table(path, filesystem=filesystem)
    assert table.num_rows == ROWS_IN and table.column_names == [
        "id", "label", "label_id", "score", "status", "adapter", "truncated", "error"]

    # The adapter came from the store into the node's cache, once, under the sha256 of its weights; the rows
    # name the adapter by its folder on the store and that hash.
    sha = adapter_weights_sha256(s3_adapter)
    assert set(table.column("adapter").to_pylist()) == {f"{random_adapter.name}@{sha[:12]}"}
    adapters = cache_dir() / "adapters"
    assert sorted(p.name for p in adapters.iterdir() if p.name.startswith((sha, f".{sha}"))) == [sha]
    assert (adapters / sha / ADAPTER_WEIGHTS).read_bytes() == (random_adapter / ADAPTER_WEIGHTS).read_bytes()


# ------------------------------------------------------------------------------------------ failures and reruns


def test_b_overwrite_of_a_finished_s3_output_with_an_actor_killed_mid_run(
        capsys, s3_scored, reference, s3_reviews, s3_adapter, bucket, tmp_path):
    finished, _ = s3_scored
    out = location(f"{bucket}/overwritten-{uuid.uuid4().hex[:8]}")
    source = location(finished)
    for item in source.list_files():  # a finished output of this tool, as the earlier run left it
        source.filesystem.copy_file(item.path, out.join(item.relative_to(source)).path)
    manifest = json.loads(out.join(MANIFEST_FILE).read_text())
    out.join(MANIFEST_FILE).write_bytes(json.dumps({**manifest, "earlier_run": True}).encode())
    before = _objects(out.uri)

    code, err = _cli_score(capsys, s3_adapter, s3_reviews, out.uri)
    assert code == 2 and err == (f"sentiment-ray score: error: output {out.uri} already exists; pass --resume to "
                                 "check it (a finished output is left as it is) or --overwrite to replace it\n")
    assert _objects(out.uri) == before  # refused: nothing touched

    marker = tmp_path / "actor-died"
    summary = _score(s3_adapter, s3_reviews, out.uri, "overwrite=true",
                     env={EXIT_AFTER_BATCHES: "3", MARKER: str(marker)})  # mid-way through an actor's first unit
    assert marker.exists()  # an actor really died (os._exit), Ray restarted it and its work was retried
    assert_same_rows(_rows(out.uri), reference)
    manifest = json.loads(out.join(MANIFEST_FILE).read_text())
    assert "earlier_run" not in manifest and manifest["rows_out"] == summary.rows_out == ROWS_IN
    assert summary.units.committed_before_this_run == 0 and summary.units.scored_this_run == UNITS


def test_c_driver_dies_before_the_commit_then_resume_scores_only_the_missing_units(
        s3_reviews, random_adapter, reference, bucket, monkeypatch):
    out = f"{bucket}/resumed-{uuid.uuid4().hex[:8]}"

    def driver_dies_before_commit(*args, **kwargs):
        raise KeyboardInterrupt("driver gone")

    monkeypatch.setattr(job, "check_committed", driver_dies_before_commit)
    with pytest.raises(KeyboardInterrupt):
        _score(random_adapter, s3_reviews, out)
    monkeypatch.undo()
    units = ScorePlan.from_json(location(out).join(PLAN_FILE).read_text()).units
    assert not location(out).join(MANIFEST_FILE).exists()  # no manifest: the output reads as unfinished
    assert len(_complete_units(out)) == len(units) == UNITS
    lost_units = units[::2]
    for fragment in _fragments(out):  # as if the driver had died with these units still in flight
        if any(u.file_index == fragment.file_index and u.start <= fragment.start < u.stop for u in lost_units):
            location(out).join(fragment.name).delete()
    assert len(_complete_units(out)) == UNITS - len(lost_units)

    with pytest.raises(OutputExistsError, match="--resume"):
        _score(random_adapter, s3_reviews, out)
    summary = _score(random_adapter, s3_reviews, out, "resume=true")

    assert_same_rows(_rows(out), reference)
    assert summary.units.committed_before_this_run == UNITS - len(lost_units)
    assert summary.units.scored_this_run == len(lost_units)
    assert summary.rows_in == summary.rows_out == ROWS_IN
    assert len(_fragments(out)) == summary.units.fragments  # no stale fragment left beside the tiling


def test_d_unreadable_files_on_s3_fail_the_job_or_are_skipped_and_reported(
        capsys, ray_session, random_adapter, bucket, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_reviews(folder / "good.parquet", ["fine", "nice"], ids=["a", "b"])
    # a file whose footer reads but whose data pages are garbage: found only when its unit is read
    texts, _ = synthetic_reviews(50, seed=2)
    damaged = write_reviews(folder / "damaged.parquet", texts, ids=[f"d{i}" for i in range(50)])
    data = bytearray(damaged.read_bytes())
    data[8:400] = os.urandom(392)
    damaged.write_bytes(bytes(data))
    inputs = f"{bucket}/unreadable-{uuid.uuid4().hex[:8]}"
    upload_folder(folder, location(inputs))

    code, err = _cli_score(capsys, random_adapter, inputs, f"{bucket}/strict-damaged")
    # Ray's own loggers may write to stderr too (and, under pytest, complain about an earlier test's closed
    # capture stream): the command's own report is one line, the last one.
    ours = [line for line in err.splitlines() if line.startswith("sentiment-ray ")]
    assert code == 2 and len(ours) == 1 and err.splitlines()[-1] == ours[0] and ours[0].startswith(
        f"sentiment-ray score: error: {inputs}/damaged.parquet rows 0-49: unreadable (")
    assert ours[0].endswith("pass --skip-unreadable-files to skip and report it instead")
    assert not location(f"{bucket}/strict-damaged").join(MANIFEST_FILE).exists()

    location(inputs).join("broken.parquet").write_bytes(b"PAR1 this is not a parquet footer")
    code, err = _cli_score(capsys, random_adapter, inputs, f"{bucket}/strict-broken")
    assert code == 2 and err.startswith(
        f"sentiment-ray score: error: {inputs}/broken.parquet: not a readable Parquet file (")
    assert not location(f"{bucket}/strict-broken").exists()  # refused before anything was written

    out = f"{bucket}/lenient-{uuid.uuid4().hex[:8]}"
    summary = _score(random_adapter, inputs, out, "skip_unreadable_files=true")
    assert sorted(_rows(out)) == ["a", "b"]
    assert [f["file"] for f in summary.files_skipped] == [f"{inputs}/broken.parquet"]
    assert [(u["file"], u["rows"]) for u in summary.units_skipped] == [(f"{inputs}/damaged.parquet", 50)]
    assert (summary.rows_in, summary.rows_out, summary.rows_skipped) == (52, 2, 50)
    manifest = json.loads(location(out).join(MANIFEST_FILE).read_text())
    assert manifest["files_skipped"][0]["error"].startswith(f"{inputs}/broken.parquet: not a readable Parquet file")


def test_e_a_folder_of_foreign_objects_is_refused_whatever_the_flags(
        capsys, ray_must_not_start, s3_reviews, s3_adapter, bucket):
    out = location(f"{bucket}/someone-elses-{uuid.uuid4().hex[:8]}")
    out.join("notes.txt").write_bytes(b"my notes")
    out.join("data/table.csv").write_bytes(b"a,b\n1,2\n")
    before = _objects(out.uri)
    for flags in ([], ["--overwrite"]):
        code, err = _cli_score(capsys, s3_adapter, s3_reviews, out.uri, *flags)
        assert code == 2 and err == (
            f"sentiment-ray score: error: output {out.uri} holds 2 entries not written by sentiment-ray, e.g. data/, "
            f"notes.txt; choose another path (--overwrite replaces only a folder holding {MANIFEST_FILE} or "
            f"{PLAN_FILE}, or an empty folder)\n")
        assert _objects(out.uri) == before


def test_f_a_store_refusing_writes_mid_run_is_one_line_exit_1_and_resume_finishes_it(
        s3_server, capsys, monkeypatch, s3_reviews, random_adapter, reference, bucket):
    """A bucket policy denying PutObject on the fragments once 2 are written (a policy or quota changed, as a disk
    fills): one line naming the object and the store's error, exit 1, no manifest; --resume once the store takes
    writes again gives every row once, as the uninterrupted run."""
    out = f"{bucket}/refused-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(FAIL_TEXT, POISON)  # the reference's bad row
    monkeypatch.setenv(SLOW_BATCH_SECONDS, "0.2")  # the run outlasts the policy's arrival
    denied: dict = {}

    def deny_after_two_fragments():
        deadline = time.monotonic() + 300
        while len(_fragments(out) if location(out).exists() else []) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        s3_server.deny_writes(f"{out}/part-*")
        denied["fragments"] = len(_fragments(out))

    watcher = threading.Thread(target=deny_after_two_fragments, daemon=True)
    watcher.start()
    try:
        code, err = _cli_score(capsys, random_adapter, s3_reviews, out)
    finally:
        watcher.join(timeout=300)
        s3_server.allow_writes(bucket)
    ours = [line for line in err.splitlines() if line.startswith("sentiment-ray ")]
    assert code == 1 and len(ours) == 1 and re.fullmatch(
        rf"sentiment-ray score: error: could not write {out}/part-\d+-\d+-\d+\.parquet: .*AWS Error ACCESS_DENIED "
        r"during \w+ operation.*; the work units committed so far are kept: rerun the same command with --resume to "
        "continue", ours[0]), err
    assert "Traceback" not in err
    assert not location(out).join(MANIFEST_FILE).exists()  # nothing that looks complete
    committed = len(_fragments(out))
    assert 2 <= denied["fragments"] <= committed < UNITS

    monkeypatch.delenv(SLOW_BATCH_SECONDS)
    code, err = _cli_score(capsys, random_adapter, s3_reviews, out, "--resume")
    assert code == 0, err
    assert_same_rows(_rows(out), reference)  # every id once (rows in == rows out), the scores of an uninterrupted run
    manifest = json.loads(location(out).join(MANIFEST_FILE).read_text())
    assert manifest["rows_in"] == manifest["rows_out"] == ROWS_IN
    assert manifest["rows_scored_this_run"] < ROWS_IN  # what the stopped run had committed was kept
