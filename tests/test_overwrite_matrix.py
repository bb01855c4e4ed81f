"""The tool deletes only what its own records say it wrote (issue 32).

Every command that writes (`finetune`, `score`, `evaluate`, `export`) runs through the CLI (in-process, `main`)
against each thing that may already be at its output: nothing, an empty folder, the tool's own finished output,
that output plus a user's file, dot-file or sub-folder, a user's folder with no marker, a symlink to an input;
at a local path, a file:// URI and on S3 (the session's moto server); with and without --overwrite. Every file
that the tool did not write (the inputs, the user's entries) is hashed before and after: all unchanged, and the
exit code is 0 where the rule lets the command proceed, else 2 with one line.

Refusals come from the commands' own checks, before any Ray work (a case that asks for Ray before refusing
fails): milliseconds each. Where a command proceeds, only its slow middle is replaced, so that its checks, the
deletion and the commit are the real ones, and no Ray starts: `finetune`'s Ray Train trainer hands back a
prepared adapter as its checkpoint; `score`'s pipeline is replaced by fragments written as its sink writes them
(named by their rows, counts in the footer), after which the job's own commit check and manifest follow. The
pipelines themselves are tested in tests/training/test_train.py and tests/test_scoring*.py. `evaluate` and `export` run
as they are. Each "finished output" is made once per module by the command itself and copied for each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.cli import main
from sentiment_ray.evaluation.job import METRICS_FILE
from sentiment_ray.io.ownership import FILES_KEY, record_files
from sentiment_ray.io.storage import Location, location, upload_folder
from sentiment_ray.model.metadata import METADATA_FILE
from sentiment_ray.scoring.output import MANIFEST_FILE, Fragment
from tests.conftest import REPO_ROOT, write_reviews

pytestmark = pytest.mark.timeout(600)

SCORE_CONFIG = str(REPO_ROOT / "configs" / "score" / "tiny_test.yaml")
FINETUNE_CONFIG = str(REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml")
MARKERS = {"score": MANIFEST_FILE, "finetune": METADATA_FILE, "evaluate": METRICS_FILE, "export": "config.json"}
STATES = ["absent", "empty", "own", "own+file", "own+dotfile", "own+subfolder", "foreign", "symlink"]
USER_ENTRIES = {  # what the user put there, and the entry a refusal names
    "own+file": ({"analysis.ipynb": b'{"cells": []}'}, "analysis.ipynb"),
    "own+dotfile": ({".env": b"TOKEN=secret"}, ".env"),
    "own+subfolder": ({"plots/roc.png": b"\x89PNG the user's figure"}, "plots/"),
    "foreign": ({"notes.txt": b"keep me", ".git/HEAD": b"ref: refs/heads/main"}, ".git/, notes.txt"),
}


# ------------------------------------------------------------------------------------------ prepared outputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, random_adapter, synthetic_train_file):
    """The inputs every case reads (hashed before and after each case) and a folder that holds each, for the
    symlink cases."""
    root = tmp_path_factory.mktemp("matrix-inputs")
    reviews = root / "reviews" / "reviews.parquet"
    reviews.parent.mkdir()
    texts = [f"{'a fine film' if i % 2 else 'a dreadful film'} number {i}" for i in range(24)]
    write_reviews(reviews, texts, [i % 2 for i in range(24)], ids=[f"r{i}" for i in range(24)])
    train = root / "train" / "train.parquet"
    train.parent.mkdir()
    shutil.copy(synthetic_train_file, train)
    adapter = root / "adapter"
    shutil.copytree(random_adapter, adapter)
    return {"reviews": reviews, "train": train, "adapter": adapter, "model": tiny_model_dir}


@pytest.fixture(scope="module")
def checkpoint(inputs, tmp_path_factory) -> Path:
    """What finetune's worker saves and reports to Ray Train: an adapter folder whose metadata lists its files."""
    folder = tmp_path_factory.mktemp("checkpoint") / "adapter"
    shutil.copytree(inputs["adapter"], folder)
    (folder / "README.md").write_text("# model card\n")
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["metrics"] = {"steps": 1, "train_loss": 0.69}
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    record_files(folder, METADATA_FILE, sort_keys=True)
    return folder


class _FakeResult:
    """A Ray Train result that is also its own checkpoint: the adapter folder at `source`."""

    error = None
    source: Path

    @property
    def checkpoint(self) -> _FakeResult:
        return self

    def to_directory(self, path: str) -> None:
        shutil.copytree(self.source, path, dirs_exist_ok=True)  # into the folder run_finetune made


class _FakeTrainer:
    """Ray Train's TorchTrainer as run_finetune uses it: fit() returns a result whose checkpoint is the prepared
    adapter. Everything before (the output checks) and after (the commit) is finetune's own."""

    def __init__(self, *args, **kwargs):
        pass

    def fit(self) -> _FakeResult:
        return _FakeResult()


def _fake_training(patch: pytest.MonkeyPatch, checkpoint: Path, ray_started: list) -> None:
    import ray.train.torch

    from sentiment_ray.ops import ray_cluster
    from sentiment_ray.scoring import job as scoring_job
    from sentiment_ray.training import checkpoints as train_checkpoints
    from sentiment_ray.training import data as train_data

    patch.setattr(ray_cluster, "ensure_ray", lambda *a, **k: ray_started.append(a))
    patch.setattr(ray_cluster, "check_requests_fit", lambda *a, **k: None, raising=False)
    patch.setattr(scoring_job, "score_requests", lambda *a, **k: [])  # sized from the cluster, which is not there
    patch.setattr(ray.train.torch, "TorchTrainer", _FakeTrainer)
    patch.setattr(train_data, "worker_datasets", lambda *a, **k: {})
    patch.setattr(train_checkpoints, "claim_run", lambda *a, **k: False)
    _FakeResult.source = checkpoint


def _write_fragments(output, plan) -> list:
    """In place of the scoring pipeline: every unit of the plan written as the sink writes it; nothing left to
    score (the job's `_pending_rows` returns the rows still to score)."""
    from sentiment_ray.scoring.sink import COUNTS_KEY, fragment_counts

    for unit in plan.units:
        rows = pq.read_table(unit.file).slice(unit.start, unit.rows)
        data = pa.table({"id": rows["id"], "score": [0.25 + 0.5 * (i % 2) for i in range(rows.num_rows)],
                         "status": ["ok"] * rows.num_rows, "truncated": [False] * rows.num_rows,
                         "adapter": ["random-adapter"] * rows.num_rows})
        data = data.replace_schema_metadata({COUNTS_KEY: json.dumps(fragment_counts(data)).encode()})
        fragment = Fragment(unit.file_index, unit.start, unit.stop)
        output.folder.join(fragment.name).write_with(lambda stream, d=data: pq.write_table(d, stream))
    return []


@pytest.fixture(scope="module")
def ray_started(checkpoint) -> list:
    """Training and the scoring pipeline replaced as the module's doc says, for the whole module; the list records
    each time a command asked for Ray (a refusal must come before)."""
    from sentiment_ray.scoring import job

    started: list = []
    with pytest.MonkeyPatch.context() as patch:
        _fake_training(patch, checkpoint, started)
        patch.setattr(job, "_pending_rows", _write_fragments)
        yield started


@pytest.fixture(scope="module")
def prepared(inputs, ray_started, tmp_path_factory):
    """One finished output per command, made by the command itself."""
    root = tmp_path_factory.mktemp("finished")
    outputs = {name: root / name for name in MARKERS}
    for command in ("score", "finetune", "export"):
        assert main(["-q", *_argv(command, inputs, outputs[command])]) == 0
    assert main(["-q", *_argv("evaluate", inputs, outputs["evaluate"], scored=outputs["score"])]) == 0
    for command in ("score", "evaluate", "finetune"):
        listed = json.loads((outputs[command] / MARKERS[command]).read_text())[FILES_KEY]
        assert listed == sorted(p.name for p in outputs[command].iterdir())
    return outputs


def _argv(command: str, inputs: dict, output, *, scored=None, overwrite: bool = False) -> list[str]:
    flag = ["--overwrite"] if overwrite else []
    if command == "score":
        return ["score", "--config", SCORE_CONFIG, "--adapter", str(inputs["adapter"]), "--input",
                str(inputs["reviews"]), "--output", str(output), *flag, "model.dtype=float32"]
    if command == "evaluate":
        return ["evaluate", "--scored", str(scored), "--labels", str(inputs["reviews"]), "--output", str(output),
                *flag]
    if command == "export":
        return ["export", "--adapter", str(inputs["adapter"]), "--output", str(output)]
    return ["finetune", "--config", FINETUNE_CONFIG, "--output-dir", str(output), *flag,
            f"model.name_or_path={inputs['model']}", f"data.train={inputs['train']}", "data.limit=16"]


# ------------------------------------------------------------------------------------------ the matrix


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(target: Location) -> dict[str, str]:
    """Every file below `target` (dot-files too, symlinks not followed) -> sha256."""
    if target.is_local:
        found = {}
        for folder, _, files in os.walk(target.path):
            for name in files:
                path = Path(folder) / name
                found[str(path.relative_to(target.path))] = sha256(path.read_bytes())
        return found
    return {f.relative_to(target): sha256(f.read_bytes()) for f in target.list_files()}


def _place(state: str, command: str, target: Location, local: Path, prepared: dict, inputs: dict) -> None:
    """Put what `state` says at the output."""
    if state == "absent":
        return
    if state == "symlink":
        link_to = {"score": inputs["reviews"].parent, "finetune": inputs["train"].parent,
                   "evaluate": inputs["reviews"].parent, "export": inputs["adapter"]}[command]
        local.symlink_to(link_to, target_is_directory=True)
        return
    if state.startswith("own"):
        if target.is_local:
            shutil.copytree(prepared[command], local)
        else:
            upload_folder(prepared[command], target)
    elif target.is_local:
        local.mkdir(parents=True)
    else:
        target.filesystem.create_dir(target.path)
    for relative, data in USER_ENTRIES.get(state, ({}, ""))[0].items():
        target.join(relative).write_bytes(data)


def _expected(command: str, state: str, storage: str, overwrite: bool) -> int:
    if command == "export" and storage == "s3":
        return 2  # export writes a local folder only
    if state in ("absent", "empty"):
        return 0
    if state == "own":
        return 0 if overwrite and command != "export" else 2  # export never replaces a folder
    return 2


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.create_bucket(f"sr-matrix-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("storage", ["local", "file", "s3"])
@pytest.mark.parametrize("command", ["score", "finetune", "evaluate", "export"])
def test_every_command_against_everything_that_may_be_at_its_output(command, storage, inputs, prepared, bucket,
                                                                    ray_started, tmp_path, capsys):
    failures = []
    for state in STATES:
        if storage == "s3" and state == "symlink":
            continue  # an object store has no symlinks
        for overwrite in ((False,) if command == "export" else (False, True)):
            case = f"{state}-{'overwrite' if overwrite else 'plain'}"
            local = tmp_path / case / "out"
            local.parent.mkdir()
            given = {"local": str(local), "file": f"file://{local}",
                     "s3": f"{bucket}/{command}-{storage}/{case}/out"}[storage]
            target = location(local) if storage != "s3" else location(given)
            _place(state, command, target, local, prepared, inputs)
            watched = {name: location(inputs[name]) for name in ("reviews", "train", "adapter")}
            watched["prepared score"] = location(prepared["score"])
            before = {name: snapshot(place) for name, place in watched.items()}
            output_before = snapshot(target) if state != "symlink" else {}
            ray_started.clear()
            code = main(["-q", *_argv(command, inputs, given, scored=prepared["score"], overwrite=overwrite)])
            err = capsys.readouterr().err.strip().splitlines()
            want = _expected(command, state, storage, overwrite)
            after = {name: snapshot(place) for name, place in watched.items()}
            problems = [f"an input changed: {name}" for name in watched if before[name] != after[name]]
            if code != want:
                problems.append(f"exit {code}, expected {want}: {err[-1:]}")
            elif want == 2:
                if len(err) != 1 or not err[0].startswith(f"sentiment-ray {command}: error: "):
                    problems.append(f"not one line: {err}")
                if state != "symlink" and snapshot(target) != output_before:
                    problems.append("the output changed")
                if ray_started:
                    problems.append("refused only after asking for Ray")
                shown = USER_ENTRIES.get(state, (None, None))[1]
                if shown and command != "export" and f"e.g. {shown}" not in err[0]:
                    problems.append(f"the refusal does not name {shown!r}: {err[0]}")
            else:
                problems += _check_finished(command, target)
            if problems:
                failures.append(f"{case}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def _check_finished(command: str, target: Location) -> list[str]:
    """A proceeding run left its finished output, whose marker lists exactly the files there."""
    files = sorted(snapshot(target))
    if command == "export":
        return [] if "config.json" in files and "model.safetensors" in files else [f"no exported model: {files}"]
    listed = json.loads(target.join(MARKERS[command]).read_bytes())[FILES_KEY]
    return [] if listed == files else [f"the marker lists {listed}, the output holds {files}"]


# ------------------------------------------------------------------------------------------ the reported cases


@pytest.fixture
def ray_calls(ray_started) -> list:
    ray_started.clear()
    return ray_started

def _refused(capsys, argv: list[str]) -> str:
    assert main(["-q", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sentiment-ray {argv[0]}: error: "), lines
    return lines[0]


def test_score_overwrite_refuses_an_output_where_the_user_saved_a_notebook_and_plots(inputs, prepared, ray_calls,
                                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared["score"], out)
    (out / "analysis.ipynb").write_text('{"cells": []}')
    (out / "plots").mkdir()
    (out / "plots" / "roc.png").write_bytes(b"\x89PNG the user's figure")
    before = snapshot(location(out))
    line = _refused(capsys, _argv("score", inputs, out, overwrite=True))
    assert line.endswith(f"error: output {out} holds 2 entries not written by sentiment-ray, e.g. analysis.ipynb, "
                         "plots/, beside the earlier output of sentiment-ray; move them out or choose another path "
                         f"(--overwrite deletes only the files that {MANIFEST_FILE} lists)")
    assert snapshot(location(out)) == before and not ray_calls


@pytest.mark.parametrize("command", ["score", "finetune", "evaluate", "export"])
def test_a_folder_holding_only_git_and_env_is_refused_with_and_without_overwrite(command, inputs, prepared,
                                                                              ray_calls, tmp_path, capsys):
    out = tmp_path / "project"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (out / ".env").write_text("TOKEN=secret")
    before = snapshot(location(out))
    for overwrite in ((False,) if command == "export" else (False, True)):
        line = _refused(capsys, _argv(command, inputs, out, scored=prepared["score"], overwrite=overwrite))
        assert f"output {out} " in line and ".env" in line and ".git/" in line
    assert snapshot(location(out)) == before and not ray_calls


def test_finetune_overwrite_refuses_an_adapter_folder_holding_the_users_notes(inputs, prepared, ray_calls, tmp_path,
                                                                            capsys):
    out = tmp_path / "adapters" / "imdb"
    shutil.copytree(prepared["finetune"], out)
    (out / "NOTES.md").write_text("lr 2e-4 was better")
    before = snapshot(location(out))
    line = _refused(capsys, _argv("finetune", inputs, out, overwrite=True))
    assert line.endswith(f"error: output {out} holds 1 entry not written by sentiment-ray, e.g. NOTES.md, beside the "
                         "earlier output of sentiment-ray; move it out or choose another path (--overwrite deletes "
                         f"only the files that {METADATA_FILE} lists)")
    assert snapshot(location(out)) == before and not ray_calls


def test_score_overwrite_refuses_a_finished_s3_output_holding_a_users_object(inputs, prepared, bucket, ray_calls,
                                                                           capsys):
    out = location(f"{bucket}/reported/scored")
    upload_folder(prepared["score"], out)
    out.join("by-hand/summary.csv").write_bytes(b"id,score\n")
    before = snapshot(out)
    line = _refused(capsys, _argv("score", inputs, out.uri, overwrite=True))
    assert f"output {out.uri} holds 1 entry not written by sentiment-ray, e.g. by-hand/, beside" in line
    assert snapshot(out) == before and not ray_calls


def test_an_output_of_an_earlier_release_is_replaced_only_when_it_holds_nothing_but_the_names_it_writes(
        inputs, prepared, ray_calls, tmp_path, capsys):
    """A manifest without `files_written` (an earlier release's): its fragments, plan and records are known by
    their names; anything else is refused."""
    out = tmp_path / "old"
    shutil.copytree(prepared["score"], out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest[FILES_KEY]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    (out / "README.txt").write_text("what these scores are")
    before = snapshot(location(out))
    assert "e.g. README.txt, beside" in _refused(capsys, _argv("score", inputs, out, overwrite=True))
    assert snapshot(location(out)) == before
    (out / "README.txt").unlink()
    assert main(["-q", *_argv("score", inputs, out, overwrite=True)]) == 0
    assert json.loads((out / MANIFEST_FILE).read_text())[FILES_KEY] == sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_on_a_full_disk_leaves_nothing_under_its_name_and_a_rerun_works(inputs, prepared, tmp_path,
                                                                                monkeypatch, capsys):
    import errno

    from matplotlib.figure import Figure

    out = tmp_path / "eval"
    save = Figure.savefig
    saved = []

    def fills_the_disk(fig, path, *args, **kwargs):
        if saved:  # the second plot: part of it written, then no space left
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", fills_the_disk)
    with pytest.raises(OSError, match="No space left on device"):
        main(["-q", *_argv("evaluate", inputs, out, scored=prepared["score"])])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial plot under the name, no staging folder
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["-q", *_argv("evaluate", inputs, out, scored=prepared["score"])]) == 0
    assert json.loads((out / METRICS_FILE).read_text())[FILES_KEY] == sorted(p.name for p in out.iterdir())


def test_evaluate_refuses_an_adapter_it_would_ignore(inputs, prepared, tmp_path, capsys):
    line = _refused(capsys, [*_argv("evaluate", inputs, tmp_path / "eval", scored=prepared["score"]),
                             "--adapter", str(inputs["adapter"])])
    assert line.endswith("error: evaluate takes --adapter only with --input (to score a labeled file first); "
                         "--scored rows are already scored: drop --adapter, or pass --input instead of --scored")
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_an_unfinished_score_output_naming_its_rows(inputs, prepared, tmp_path, capsys):
    scored = tmp_path / "scored"
    shutil.copytree(prepared["score"], scored)
    (scored / MANIFEST_FILE).unlink()  # a run stopped before its commit ...
    fragments = sorted(f for f in scored.iterdir() if Fragment.parse(f.name))
    fragments[0].unlink()  # ... with one of its units not written yet
    missing = Fragment.parse(fragments[0].name).rows
    line = _refused(capsys, _argv("evaluate", inputs, tmp_path / "eval", scored=scored))
    assert line.endswith(f"error: scored output {scored} is unfinished: its run committed {24 - missing} of 24 "
                         f"planned rows and wrote no {MANIFEST_FILE}; finish it with `sentiment-ray score ... "
                         "--resume` first")
    assert not (tmp_path / "eval").exists()


def test_evaluate_keeps_the_scored_output_inside_its_own_and_lists_it(inputs, prepared, tmp_path, capsys):
    """The demo's layout: `score --output run/scored`, then `evaluate --scored run/scored --output run`."""
    out = tmp_path / "run"
    shutil.copytree(prepared["score"], out / "scored")
    scored_before = snapshot(location(out / "scored"))
    for overwrite in (False, True):
        assert main(["-q", *_argv("evaluate", inputs, out, scored=out / "scored", overwrite=overwrite)]) == 0
        assert snapshot(location(out / "scored")) == scored_before
        listed = json.loads((out / METRICS_FILE).read_text())[FILES_KEY]
        assert listed == sorted(snapshot(location(out)))
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # no staging or old folder left beside it
    (out / "scored" / "notes.md").write_text("mine")  # inside the score output: score's own rule refuses it
    assert "e.g. notes.md" in _refused(capsys, _argv("score", inputs, out / "scored", overwrite=True))
