"""The scoring job on a private local Ray: several files, a pool of two actors, bad inputs."""

import dataclasses
import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.cli import main
from sentiment_ray.config import ScoreConfig, load_config
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.outputs import OutputExistsError
from sentiment_ray.model.tiny import synthetic_reviews
from sentiment_ray.ops.faults import SLOW_BATCH_SECONDS
from sentiment_ray.scoring import MANIFEST_FILE, PLAN_FILE, run_scoring
from sentiment_ray.scoring.manifest import ScoreManifest
from tests.conftest import REPO_ROOT, RESCORED_TOLERANCE, assert_same_rows, write_reviews

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def adapter_dir(ray_session, tiny_model_dir, synthetic_train_file, tmp_path_factory):
    """The finetune job on ~64 rows, as the users' integration path runs it."""
    from sentiment_ray.config import FinetuneConfig
    from sentiment_ray.training.job import run_finetune

    cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={synthetic_train_file}",
        f"output_dir={tmp_path_factory.mktemp('score-adapter') / 'adapter'}", "data.limit=64",
    ])
    return run_finetune(cfg)["adapter_dir"]


def _config(adapter_dir, input_path, output, *extra):
    return load_config(ScoreConfig, REPO_ROOT / "configs" / "score" / "tiny_test.yaml", [
        f"adapter={adapter_dir}", f"input={input_path}", f"output={output}", "model.dtype=float32", *extra,
    ])


@pytest.fixture(scope="module")
def reviews_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reviews")
    texts, labels = synthetic_reviews(1200, seed=5)
    for part in range(4):  # 4 files of 300 rows
        rows = slice(part * 300, (part + 1) * 300)
        write_reviews(folder / f"part-{part}.parquet", texts[rows], labels[rows],
                      ids=[f"r{i}" for i in range(rows.start, rows.stop)], source=[f"p{part}"] * 300)
    return folder


def test_scores_every_row_exactly_once_with_two_actors(adapter_dir, reviews_dir, tmp_path, monkeypatch):
    out = tmp_path / "scored"
    # The tiny model scores all 1,200 rows in about a second, before a second actor on 2 busy cores has loaded:
    # slowed batches give both actors work, as a real model's batches do.
    monkeypatch.setenv(SLOW_BATCH_SECONDS, "0.4")
    # Two scoring actors and a pool of tokenizing actors (the tiny config has one and tokenizes in tasks).
    summary = run_scoring(_config(adapter_dir, reviews_dir / "*.parquet", out, "keep_columns=[source]",
                                  "pool_size=2", "prepare_actors=1", "num_cpus_per_prepare_actor=0.5"))
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert summary.rows_in == summary.rows_out == table.num_rows == 1200
    assert sorted(ids) == sorted(f"r{i}" for i in range(1200))  # every id exactly once
    scores = table.column("score").to_pylist()
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert table.column_names == ["id", "source", "label", "label_id", "score", "status", "adapter", "truncated",
                                  "error"]
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert {(lab, int(s >= 0.5)) for lab, s in zip(table.column("label").to_pylist(), scores)} <= {
        ("negative", 0), ("positive", 1)}
    assert set(table.column("label_id").to_pylist()) <= {0, 1}
    assert table.column("adapter")[0].as_py().startswith("adapter@")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["rows_out"] == 1200 and manifest["status_counts"] == {"ok": 1200}
    assert manifest["rows_scored"] == 1200 and manifest["rows_marked"] == manifest["rows_skipped"] == 0
    assert manifest["rows_scored_this_run"] == 1200 and manifest["output"] == summary.output == str(out)
    # The file and the returned record are the same fields (the config aside: JSON has no tuples).
    assert {k: v for k, v in manifest.items() if k != "config"} == {
        k: v for k, v in summary.to_dict().items() if k != "config"}
    # Both scoring actors took batches, and their busy time is a part of the time from their first to last batch.
    stage = summary.score_stage
    assert stage.actors == 2 and stage.batches >= 1200 // 64
    assert 0 < stage.busy_seconds <= stage.active_seconds
    assert stage.busy_fraction == pytest.approx(stage.busy_seconds / stage.active_seconds, abs=1e-3)
    # Each actor's share: the rows and batches add up, and its batches ran within this run's wall time.
    assert len(stage.per_actor) == 2 and sum(a.rows for a in stage.per_actor) == 1200
    assert sum(a.batches for a in stage.per_actor) == stage.batches
    assert sum(a.busy_seconds for a in stage.per_actor) == pytest.approx(stage.busy_seconds, abs=0.01)
    for actor in stage.per_actor:
        assert 0 < actor.first_batch_offset < actor.last_batch_offset < summary.seconds
        # each actor had its model loaded before its first batch, and ran the config's forward
        assert 0 < actor.load_seconds < actor.ready_offset <= actor.first_batch_offset and actor.forward == "eager"
        assert actor.quantization == "none"  # model.quantization as applied (tests/model/test_fp8.py)
    assert summary.quantization == manifest["quantization"] == "none"
    # The timeline: every step of the run, increasing, in seconds from the call, ending with the commit.
    steps = summary.timeline.steps()
    assert [name for name, _ in steps] == ["ray_ready", "pipeline_started", "scoring_actor_ready", "first_batch",
                                           "last_batch", "committed"]
    assert all(a < b for (_, a), (_, b) in zip(steps, steps[1:])) and steps[0][1] > 0
    assert summary.timeline.scoring_actor_ready == pytest.approx(
        summary.timeline.pipeline_started + min(a.ready_offset for a in stage.per_actor), abs=0.01)
    assert ScoreManifest.from_json((out / MANIFEST_FILE).read_text(), str(out)).score_stage == stage
    # Written in place, one fragment per work unit's rows (or a few when a unit's rows reached the sink in
    # several writes), named so that file-name order is input order; nothing hidden is left behind.
    files = sorted(p.name for p in out.iterdir())
    assert files == [MANIFEST_FILE, PLAN_FILE] + sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(files) - 2 <= 2 * manifest["units"]["total"] and manifest["units"]["fragments"] == len(files) - 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    in_file_order = pq.read_table(out, columns=["id"]).column("id").to_pylist()  # read in file-name order
    assert in_file_order == [f"r{i}" for i in range(1200)]  # input order: the files are part-0 ... part-3


def test_null_and_empty_text_rows_are_kept_and_marked(adapter_dir, tmp_path):
    path = write_reviews(tmp_path / "in.parquet", ["great film", None, "", "   ", "awful"], ids=list("abcde"))
    out = tmp_path / "scored"
    summary = run_scoring(_config(adapter_dir, path, out))
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 5 and summary.status_counts == {"ok": 2, "empty_text": 3}
    assert summary.rows_scored == 2 and summary.rows_marked == 3
    for key in "bcd":
        assert rows[key]["status"] == "empty_text" and rows[key]["score"] is None and rows[key]["label"] is None
    assert rows["a"]["status"] == rows["e"]["status"] == "ok"


def test_fp8_where_it_cannot_run_scores_as_without_it_and_the_manifest_says_why(adapter_dir, tmp_path):
    """model.quantization=fp8 on CPU actors: each says why in one line and scores in model.dtype (auto: float32
    on a CPU), never fails; the manifest records what was applied beside the config's request."""
    path = write_reviews(tmp_path / "in.parquet", ["great film", "awful", "the plot was dull"], ids=list("abc"))
    scored = {}
    for quantization in ("none", "fp8"):
        out = tmp_path / quantization
        summary = run_scoring(_config(adapter_dir, path, out, "model.dtype=auto",
                                      f"model.quantization={quantization}"))
        assert summary.status_counts == {"ok": 3} and summary.config["model"]["quantization"] == quantization
        scored[quantization] = dict(zip(*pq.read_table(out, columns=["id", "score"]).to_pydict().values()))
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        assert manifest["quantization"] == summary.quantization
    assert summary.quantization == "none (fp8 unavailable: no CUDA)"
    assert scored["fp8"] == scored["none"]


@dataclasses.dataclass(frozen=True)
class PartScored:
    scores: dict[str, float]  # id -> score
    started: list[str]  # the Ray Data pool actors the run started, by name


def _pool_actors() -> dict[str, str]:
    """id -> name of every actor of a Ray Data actor pool the session's Ray has had, alive or ended."""
    from ray._private import state

    return {actor_id: actor["ActorClassName"] for actor_id, actor in state.actors().items()
            if actor["ActorClassName"].startswith("MapWorker(")}


def _score_part_one(adapter_dir, reviews_dir, out, *overrides) -> PartScored:
    before = _pool_actors()
    summary = run_scoring(_config(adapter_dir, reviews_dir / "part-1.parquet", out, *overrides))
    assert summary.rows_in == summary.rows_out == 300 and summary.status_counts == {"ok": 300}
    return PartScored(dict(zip(*pq.read_table(out, columns=["id", "score"]).to_pydict().values())),
                      sorted(name for actor_id, name in _pool_actors().items() if actor_id not in before))


@pytest.fixture(scope="module")
def part_one_as_configured(adapter_dir, reviews_dir, tmp_path_factory) -> PartScored:
    """part-1 scored by the tiny config as it is (tokenizing in tasks, eager forwards): what the tokenizing modes
    and the packed forwards are compared with (one run for both tests: each run is ~7 CPU-s of actor start-up)."""
    return _score_part_one(adapter_dir, reviews_dir, tmp_path_factory.mktemp("part-one") / "scored")


def test_the_job_with_packed_forwards_scores_as_the_eager_job(adapter_dir, reviews_dir, part_one_as_configured,
                                                              tmp_path):
    """`forward: packed` through the whole job (config, scoring actor, sink): the eager job's rows and scores."""
    packed = _score_part_one(adapter_dir, reviews_dir, tmp_path / "packed", "forward=packed", "max_batch_tokens=512")
    assert_same_rows(packed.scores, part_one_as_configured.scores, tolerance=1e-5)


def test_tokenizing_in_tasks_scores_as_a_tokenizing_actor_and_starts_no_actor_for_it(adapter_dir, reviews_dir,
                                                                                    part_one_as_configured, tmp_path):
    """`prepare_actors: 0` (the tiny config's) tokenizes in Ray tasks: the tokens, so the scores, of a pool of one
    tokenizing actor, and the run starts its scoring actor only. Where the tasks ask for what a scoring actor asks
    for, Ray Data fuses the two stages: the scoring actor tokenizes its own batches."""
    tasks = part_one_as_configured
    fused = _score_part_one(adapter_dir, reviews_dir, tmp_path / "fused", "num_cpus_per_prepare_actor=1")
    actor = _score_part_one(adapter_dir, reviews_dir, tmp_path / "actor", "prepare_actors=1",
                            "num_cpus_per_prepare_actor=0.5")
    assert tasks.started == ["MapWorker(MapBatches(ScoreStage))"]
    assert fused.started == ["MapWorker(MapBatches(prepare_in_task)->MapBatches(ScoreStage))"]
    assert actor.started == ["MapWorker(MapBatches(PrepareStage))", "MapWorker(MapBatches(ScoreStage))"]
    for other in (fused, actor):
        assert_same_rows(other.scores, tasks.scores)


def test_labels_follow_the_adapters_stored_threshold_or_the_one_given(adapter_dir, tmp_path, capsys):
    texts, _ = synthetic_reviews(80, seed=21)
    path = write_reviews(tmp_path / "in.parquet", texts, ids=[f"t{i}" for i in range(80)])
    stored = tmp_path / "adapter"
    shutil.copytree(adapter_dir, stored)
    metadata = json.loads((stored / "sentiment_ray.json").read_text())
    (stored / "sentiment_ray.json").write_text(json.dumps({**metadata, "threshold": 0.999}))

    summary = run_scoring(_config(stored, path, tmp_path / "stored"))
    rows = pq.read_table(tmp_path / "stored").to_pylist()
    assert summary.plan_settings["threshold"] == 0.999
    assert [r["label_id"] for r in rows] == [int(r["score"] >= 0.999) for r in rows]
    median = sorted(r["score"] for r in rows)[40]
    assert main(["score", "--config", str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "--adapter", str(stored),
                 "--input", str(path), "--output", str(tmp_path / "given"), "--threshold", repr(median),
                 "model.dtype=float32"]) == 0
    given = pq.read_table(tmp_path / "given").to_pylist()
    # The threshold changes labels only; the scores are those of a second scoring of the same rows, equal up to
    # float32 rounding of batches Ray Data may form differently (RESCORED_TOLERANCE, tests/conftest.py).
    assert [r["score"] for r in given] == pytest.approx([r["score"] for r in rows], abs=RESCORED_TOLERANCE)
    assert [r["label_id"] for r in given] == [int(r["score"] >= median) for r in given]
    assert [r["label"] for r in given] == [["negative", "positive"][int(r["score"] >= median)] for r in given]
    assert sum(r["label_id"] for r in given) >= 40 > sum(r["label_id"] for r in rows)  # it really moved labels
    manifest = json.loads((tmp_path / "given" / MANIFEST_FILE).read_text())
    assert manifest["plan_settings"]["threshold"] == median
    capsys.readouterr()
    assert main(["score", "--adapter", str(stored), "--input", str(path), "--output", str(tmp_path / "x"),
                 "--threshold", "1.5"]) == 2
    assert "threshold must be in [0, 1]" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(adapter_dir, tmp_path):
    path = write_reviews(tmp_path / "in.parquet", ["good"], ids=["a"])
    out = tmp_path / "scored"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for flags in ([], ["resume=true"], ["overwrite=true"]):  # not written by this tool: no flag replaces it
        with pytest.raises(OutputExistsError, match=f"^output {out} holds 1 entry not written by sentiment-ray, "
                                                    r"e\.g\. precious\.txt; choose another path"):
            run_scoring(_config(adapter_dir, path, out, *flags))
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    run_scoring(_config(adapter_dir, path, out))  # an empty folder is free
    with pytest.raises(OutputExistsError, match="--resume .* or --overwrite"):
        run_scoring(_config(adapter_dir, path, out))
    # an earlier output of this tool (it holds the manifest) is replaced with --overwrite, nothing left behind
    write_reviews(path, ["good", "bad"], ids=["a", "b"])
    assert run_scoring(_config(adapter_dir, path, out, "overwrite=true")).rows_out == 2
    assert pq.read_table(out).column("id").to_pylist() == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "scored"]  # no hidden .scored.* left
    # --resume on a finished output leaves it as it is and reports it
    before = (out / MANIFEST_FILE).read_text()
    assert run_scoring(_config(adapter_dir, path, out, "resume=true")).rows_out == 2
    assert (out / MANIFEST_FILE).read_text() == before


@pytest.mark.parametrize("case", ["missing_text", "missing_id", "no_files", "corrupt", "id_types", "collision"])
def test_bad_input_fails_before_any_output(adapter_dir, tmp_path, case):
    folder = tmp_path / "in"
    folder.mkdir()
    write_reviews(folder / "good.parquet", ["fine"], ids=["a"])
    pattern, extra, message = str(folder / "*.parquet"), [], None
    if case == "missing_text":
        pq.write_table(pa.table({"id": ["b"], "review": ["x"]}), folder / "other.parquet")
        message = r"other\.parquet: no text column 'text'"
    elif case == "missing_id":
        pq.write_table(pa.table({"text": ["x"]}), folder / "noid.parquet")
        message = r"noid\.parquet: no id column 'id'"
    elif case == "no_files":
        pattern, message = str(folder / "nothing-*.parquet"), "no Parquet files match"
    elif case == "corrupt":
        (folder / "broken.parquet").write_bytes(b"PAR1 garbage")
        message = r"broken\.parquet: not a readable Parquet file.*--skip-unreadable-files"
    elif case == "id_types":
        pq.write_table(pa.table({"id": [7], "text": ["x"]}), folder / "int-ids.parquet")
        message = r"int-ids\.parquet: column 'id' is int64 but .*good\.parquet has string"
    elif case == "collision":
        extra, message = ["keep_columns=[score]"], "collide"
    out = tmp_path / "scored"
    with pytest.raises(InputError, match=message):
        run_scoring(_config(adapter_dir, pattern, out, *extra))
    assert not out.exists() and not list(tmp_path.glob(".scored.*"))


def test_one_small_file_still_feeds_every_actor(tmp_path):
    """A small file is cut into several work units, so that the second actor of the pool is not left idle."""
    from sentiment_ray.scoring.plan import rows_per_unit
    from sentiment_ray.scoring.work_units import plan_units

    texts, _ = synthetic_reviews(1000, seed=3)
    path = write_reviews(tmp_path / "one.parquet", texts)
    cfg = ScoreConfig(input=str(path), output=str(tmp_path / "o"), batch_size=64, pool_size=2)
    units = plan_units([str(path)], rows_per_unit(cfg, 1000))
    assert len(units) == 8 and sum(u.rows for u in units) == 1000  # 4 units per actor, in whole batches


def test_evaluate_scores_a_labeled_file_in_one_go(adapter_dir, tmp_path, capsys):
    from sentiment_ray.cli import main

    texts, labels = synthetic_reviews(40, seed=21)
    labeled = write_reviews(tmp_path / "labeled.parquet", texts, labels)
    out = tmp_path / "eval"
    assert main(["evaluate", "--adapter", str(adapter_dir), "--input", str(labeled), "--output", str(out),
                 "--config", str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), "model.dtype=float32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["n_unscored"] == 0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert pq.read_table(out / "scored").num_rows == 40
    assert "accuracy" in capsys.readouterr().out.lower()


def _checksums(folder):
    """Every file and folder under `folder`, with the files' content hashes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", ["truncated_weights", "missing_base", "zero_shot_missing_base", "explicit_id_column"])
def test_checks_before_work_exit_2_with_one_line_and_write_nothing(random_adapter, tmp_path, capsys, case):
    """Found on the driver before the work folder exists or any actor starts (no Ray is running here)."""
    adapter = shutil.copytree(random_adapter, tmp_path / "adapter")
    write_reviews(tmp_path / "in.parquet", ["fine", "awful"], ids=["a", "b"])
    weights = adapter / "adapter_model.safetensors"
    flags = ["--adapter", str(adapter)]
    if case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
        message = f"{weights}: not readable safetensors (Error while deserializing header"
    elif case == "missing_base":
        recorded = json.loads((adapter / "sentiment_ray.json").read_text())
        recorded["base_model"] = str(tmp_path / "moved-away")
        (adapter / "sentiment_ray.json").write_text(json.dumps(recorded))
        message = (f"base model {tmp_path / 'moved-away'} recorded in {adapter / 'sentiment_ray.json'} cannot be "
                   "found: no such folder; pass --base-model to name it")
    elif case == "zero_shot_missing_base":
        flags = ["--base-model", str(tmp_path / "no-model")]
        message = f"base model {tmp_path / 'no-model'} cannot be found: no such folder"
    else:
        flags += ["--id-column", "review_id"]
        message = (f"{tmp_path / 'in.parquet'}: no id column 'review_id' (columns: ['id', 'text']); name a column "
                   "the input files have, or set no id column to derive ids '<file key>:<row index>'")
    before = _checksums(tmp_path)
    assert main(["score", "--config", str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml"), *flags,
                 "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sentiment-ray score: error: {message}") and len(err.strip().splitlines()) == 1
    assert _checksums(tmp_path) == before  # no out, no .out.partial, no staging folder; inputs untouched


def test_the_id_column_is_id_when_the_files_have_it_else_derived_and_a_named_one_must_exist(tmp_path):
    from sentiment_ray.scoring.plan import check_inputs

    with_id = write_reviews(tmp_path / "with-id.parquet", ["x"], ids=["a"])
    other_id = write_reviews(tmp_path / "other.parquet", ["x"], ids=["a"], review_id=["r1"])
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "no-id.parquet")

    def rule(path, *extra):
        inputs = check_inputs(load_config(ScoreConfig, None, [f"input={path}", "output=o", *extra]))
        return inputs.id_column, inputs.derived_ids, inputs.schema.field(0).type

    assert rule(with_id) == ("id", False, pa.string())
    assert rule(tmp_path / "no-id.parquet") == ("id", True, pa.string())
    assert rule(other_id, "id_column=review_id") == ("review_id", False, pa.string())
    with pytest.raises(InputError, match=r"no-id\.parquet: no id column 'id' \(columns: \['text'\]\); name a column"):
        rule(tmp_path / "no-id.parquet", "id_column=id")  # named explicitly: no silent switch to derived ids
    with pytest.raises(InputError, match=r"no-id\.parquet: no id column 'review_id'.*but .*other\.parquet has one"):
        rule(tmp_path / "*.parquet", "id_column=review_id")


def test_a_plan_written_before_model_quantization_existed_resumes_unless_quantization_is_asked_for(tmp_path):
    """An unfinished run planned by a release without `model.quantization` ran without it: resuming it with
    quantization none is the same model; with fp8 it is not (its scores would differ from the first run's)."""
    from sentiment_ray.config import to_dict
    from sentiment_ray.scoring.plan import ScorePlan, check_inputs, make_plan

    path = write_reviews(tmp_path / "in.parquet", ["good movie", "bad one"], ids=["x", "y"])

    def plan(*overrides):
        cfg = load_config(ScoreConfig, None, [f"input={path}", f"output={tmp_path / 'out'}", *overrides])
        return make_plan(cfg, check_inputs(cfg), None, to_dict(cfg.model))

    legacy = ScorePlan.from_json(plan().to_json())
    del legacy.settings["model"]["quantization"]
    assert legacy.changed_settings(plan()) == []
    assert legacy.changed_settings(plan("model.quantization=fp8")) == ["model"]
    assert plan().changed_settings(plan("model.quantization=fp8")) == ["model"]


def test_an_input_replaced_after_the_plan_was_written_is_named_even_with_its_size_and_time_kept(tmp_path):
    """`cp -p` of another file of the same size keeps size and modification time: the footer digest differs."""
    import os

    from sentiment_ray.scoring.plan import ScorePlan, check_inputs, make_plan

    path = write_reviews(tmp_path / "in.parquet", ["good movie", "bad one"], ids=["x", "y"])
    cfg = load_config(ScoreConfig, None, [f"input={path}", f"output={tmp_path / 'out'}"])
    recorded = ScorePlan.from_json(make_plan(cfg, check_inputs(cfg), None, {}).to_json())
    before = os.stat(path)
    write_reviews(tmp_path / "other.parquet", ["good movif", "bad onf"], ids=["x", "y"])
    shutil.copyfile(tmp_path / "other.parquet", path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size
    (changed,) = recorded.changed_settings(make_plan(cfg, check_inputs(cfg), None, {}))
    assert changed == (f"inputs ({path} changed since the plan was written: its content (same size and modification "
                       "time, another Parquet footer))")
    write_reviews(path, ["a", "b", "c"], ids=["x", "y", "z"])
    (changed,) = recorded.changed_settings(make_plan(cfg, check_inputs(cfg), None, {}))
    assert changed.startswith(f"inputs ({path} changed since the plan was written: rows 2 -> 3, bytes ")
    legacy = ScorePlan.from_json(recorded.to_json())  # a plan of an earlier version had no footer digest
    for record in legacy.settings["inputs"]:
        del record["footer_sha256"]
    write_reviews(path, ["good movie", "bad one"], ids=["x", "y"])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert legacy.changed_settings(make_plan(cfg, check_inputs(cfg), None, {})) == []
