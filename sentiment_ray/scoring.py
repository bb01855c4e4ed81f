"""The scoring job: every input row scored exactly once, resumable after a crash, bad rows marked, not fatal.

The input is cut into work units (row ranges along row groups: `work_units.py`). Ray Data hands the units to
an actor pool (`map_batches(ScoringActor, compute=ActorPoolStrategy)`); each actor loads base + adapter once,
reads its unit, scores it batch by batch and commits the unit's result as one Parquet file, written under a
temporary name and renamed (`.<output>.partial/units/<unit>.parquet`). A unit is committed whole or not at
all, so a crash (actor or driver) loses at most the units in flight; Ray restarts a dead actor and retries its
unit, and a rerun with `--resume` scores only the units not yet committed. When every unit is there, the units
are gathered into files of `rows_per_file` rows in a staging folder, counted (rows out == rows in, checked
against each unit and the total) and the folder is renamed into place with the manifest: the output name
never holds a partial result. docs/RESILIENCE.md explains the choice against Ray Data's CheckpointConfig.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sentiment_ray.config import ScoreConfig, ScoringModelConfig, to_dict
from sentiment_ray.data import (
    InputError,
    check_columns,
    is_uri,
    one_line,
    open_parquet,
    resolve_parquet_files,
    text_values,
)
from sentiment_ray.faults import FaultPlan
from sentiment_ray.outputs import (
    OutputExistsError,
    ResumableOutput,
    commit,
    open_resumable_output,
    refuse_overlap,
    staging_dir,
    write_atomically,
)
from sentiment_ray.prompt import PromptSpec
from sentiment_ray.run_lock import RunLock
from sentiment_ray.work_units import WorkUnit, derived_ids, plan_units, read_unit

PREDICTION_COLUMNS = ("label", "label_id", "score", "status", "adapter", "truncated", "error")
DEFAULT_ID_COLUMN = "id"  # used when the files have it; derived ids go into a column of this name
MANIFEST_FILE = "_sentiment_ray_manifest.json"
PLAN_FILE = "_plan.json"
UNITS_DIR = "units"
SKIPPED_SUFFIX = ".skipped.json"
FAULT_MARKER = "_fault_injected"
PROGRESS_EVERY_S = 20.0
UNITS_PER_ACTOR = 4  # a small input is cut into at least this many units per actor, so none sits idle
# Ray Data restarts a dead actor and retries its unit without limit; a unit that kills its actor every time (a
# row that crashes the process, not just raises) would loop forever, so each attempt is counted on disk and the
# job ends, naming the unit, after this many.
UNIT_ATTEMPTS = 4
OK_STATUS = "ok"


def output_schema(id_field: pa.Field, keep_fields: list[pa.Field]) -> pa.Schema:
    return pa.schema([
        id_field, *keep_fields,
        pa.field("label", pa.string()), pa.field("label_id", pa.int8()), pa.field("score", pa.float64()),
        pa.field("status", pa.string()), pa.field("adapter", pa.string()), pa.field("truncated", pa.bool_()),
        pa.field("error", pa.string()),
    ])


def unit_result_path(work: Path, unit: WorkUnit) -> Path:
    return work / UNITS_DIR / f"{unit.name}.parquet"


def unit_skipped_path(work: Path, unit: WorkUnit) -> Path:
    return work / UNITS_DIR / f"{unit.name}{SKIPPED_SUFFIX}"


def unit_is_done(work: Path, unit: WorkUnit) -> bool:
    return unit_result_path(work, unit).exists() or unit_skipped_path(work, unit).exists()


class ScoringActor:
    """Ray Data callable class: one model per actor; each call scores and commits one work unit."""

    def __init__(self, adapter: str | None, model: dict, prompt: dict, job: dict, torch_threads: int | None,
                 max_batch_tokens: int | None = None, faults: dict | None = None):
        import torch

        if torch_threads and not torch.cuda.is_available():
            torch.set_num_threads(torch_threads)  # Ray pins OMP threads to the reserved CPUs; say it explicitly
        from sentiment_ray.scorer import SentimentScorer

        self.scorer = SentimentScorer.load(adapter, ScoringModelConfig(**model), PromptSpec.from_dict(prompt),
                                           max_batch_tokens)
        self.job = job
        self.work = Path(job["work_dir"])
        self.faults = FaultPlan(**(faults or {}))
        self.batches_done = self.rows_done = 0
        self.started = self.last_report = time.perf_counter()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.score_unit(WorkUnit.from_dict(row)) for row in batch.to_pylist()])

    def score_unit(self, unit: WorkUnit) -> dict:
        outcome = {"unit": unit.name, "rows": unit.rows}
        if unit_is_done(self.work, unit):  # a retried task whose unit was committed before the actor died
            return {**outcome, "outcome": "already_committed"}
        self._count_attempt(unit)
        job = self.job
        try:
            rows = read_unit(unit, [job["id_column"], job["text_column"], *job["keep_columns"]])
        except Exception as exc:  # noqa: BLE001 - any read failure is reported with the file and rows, below
            message = f"{unit.describe()}: unreadable ({type(exc).__name__}: {one_line(exc)})"
            if not job["skip_unreadable_files"]:
                raise InputError(f"{message}; pass --skip-unreadable-files to skip and report it instead") from None
            record = {**unit.to_dict(), "rows": unit.rows, "error": message}
            write_atomically(unit_skipped_path(self.work, unit), lambda p: p.write_text(json.dumps(record) + "\n"))
            print(f"[score] WARNING: skipped {message}", flush=True)
            return {**outcome, "outcome": "skipped"}
        scored = self.score_rows(unit, rows)
        write_atomically(unit_result_path(self.work, unit), lambda p: pq.write_table(scored, p))
        return {**outcome, "outcome": "committed"}

    def score_rows(self, unit: WorkUnit, rows: pa.Table) -> pa.Table:
        from sentiment_ray.scorer import BatchScores, score_with_retry

        job = self.job
        texts = text_values(rows.column(job["text_column"]))  # invalid UTF-8 marks its row, not the unit
        parts = []
        for start in range(0, rows.num_rows, job["batch_size"]):
            parts.append(score_with_retry(self._score, texts[start:start + job["batch_size"]]))
            self.batches_done += 1
            self._report_progress(len(parts[-1].scores))
            self.faults.maybe_exit(self.batches_done)
        result = BatchScores.concat(parts) if parts else BatchScores([], [], [])
        if len(result.scores) != unit.rows:  # cannot happen by construction; a unit is committed whole or not at all
            raise RuntimeError(f"{unit.describe()}: {len(result.scores)} results for {unit.rows} rows")
        id_values = derived_ids(unit) if job["derived_ids"] else rows.column(job["id_column"])
        columns = {job["id_column"]: id_values, **{name: rows.column(name) for name in job["keep_columns"]}}
        columns["label"] = pa.array(result.labels, pa.string())
        columns["label_id"] = pa.array(result.label_ids, pa.int8())
        columns["score"] = pa.array(result.scores, pa.float64())
        columns["status"] = pa.array(result.statuses, pa.string())
        columns["adapter"] = pa.array([self.scorer.identity] * unit.rows, pa.string())
        columns["truncated"] = pa.array(result.truncated, pa.bool_())
        columns["error"] = pa.array(result.errors, pa.string())
        table = pa.table(columns)
        try:
            return table.cast(job["schema"])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise InputError(f"{unit.file}: column types differ from the other input files ({exc})") from None

    def _count_attempt(self, unit: WorkUnit) -> None:
        """Count this attempt at the unit; too many means its rows kill the process. Only this driver run's
        attempts count: within one run a unit is attempted again only after the actor scoring it died, while an
        attempt cut short by a killed driver says nothing about the unit's rows."""
        counter = self.work / UNITS_DIR / f"{unit.name}.attempts"
        try:
            record = json.loads(counter.read_text())
        except (FileNotFoundError, ValueError):
            record = None
        same_run = isinstance(record, dict) and record.get("run") == self.job["run_id"]
        attempts = record["attempts"] + 1 if same_run else 1
        if attempts > UNIT_ATTEMPTS:
            raise InputError(f"{unit.describe()}: {UNIT_ATTEMPTS} attempts in this run ended with the scoring "
                             "process dying; a row there crashes the process (memory?). Fix or remove it, then rerun "
                             "with --resume")
        payload = json.dumps({"run": self.job["run_id"], "attempts": attempts})
        write_atomically(counter, lambda p: p.write_text(payload))

    def _score(self, texts: list):
        self.faults.maybe_fail(texts)
        return self.scorer.score_texts(texts)

    def _report_progress(self, rows: int) -> None:
        self.rows_done += rows
        now = time.perf_counter()
        if now - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = now
            print(f"[score] actor {os.getpid()} scored {self.rows_done} rows "
                  f"({self.rows_done / (now - self.started):.1f} rows/s)", flush=True)


# ---------------------------------------------------------------------------------------------- the inputs


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    return a == b or pa.types.is_null(a) or pa.types.is_null(b)


def check_inputs(cfg: ScoreConfig) -> dict:
    """Every input file's footer read and its columns checked before any work starts. Returns the readable
    files, the unreadable ones (only with skip_unreadable_files), the row count, the id rule and the schema.
    A column named in the config (text, kept, or an id_column set explicitly) must be in the files: a typo is an
    error naming the file and its columns, never a silent switch to derived ids."""
    id_column = cfg.id_column or DEFAULT_ID_COLUMN
    clash = sorted(set(cfg.keep_columns) & (set(PREDICTION_COLUMNS) | {id_column}))
    if clash:
        raise InputError(f"keep_columns {clash} would collide with the id or prediction columns {list(PREDICTION_COLUMNS)}")
    files, unreadable, schemas, rows_by_file = [], [], {}, {}
    for path in resolve_parquet_files(cfg.input):
        try:
            parquet = open_parquet(path)
            schema = parquet.schema_arrow
        except InputError as exc:
            if not cfg.skip_unreadable_files:
                raise InputError(f"{exc}; pass --skip-unreadable-files to skip and report it instead") from None
            print(f"[score] WARNING: skipping {exc}", flush=True)
            unreadable.append({"file": path, "error": str(exc)})
            continue
        check_columns(path, schema, {cfg.text_column: "text", **{c: "kept" for c in cfg.keep_columns}},
                      strings_only=False)  # a non-string text column is scored as marked rows
        files.append(path)
        schemas[path] = schema
        rows_by_file[path] = parquet.metadata.num_rows  # from the footer already read, not a second open
    if not files:
        raise InputError(f"no readable Parquet file among {len(unreadable)} matching {cfg.input!r}")
    with_id = [f for f in files if id_column in schemas[f].names]
    if cfg.id_column is not None and not with_id:
        raise InputError(f"{files[0]}: no id column {id_column!r} (columns: {schemas[files[0]].names}); name a "
                         "column the input files have, or set no id column to derive ids '<file key>:<row index>'")
    if with_id and len(with_id) != len(files):
        missing = next(f for f in files if id_column not in schemas[f].names)
        raise InputError(f"{missing}: no id column {id_column!r} (columns: {schemas[missing].names}), but "
                         f"{with_id[0]} has one; give every file an id column, or none (ids are then derived)")
    first = schemas[files[0]]
    for name in ([id_column] if with_id else []) + list(cfg.keep_columns):
        for path in files[1:]:
            if not _same_type(schemas[path].field(name).type, first.field(name).type):
                raise InputError(f"{path}: column {name!r} is {schemas[path].field(name).type} but "
                                 f"{files[0]} has {first.field(name).type}; all input files must agree")
    id_type = first.field(id_column).type if with_id else pa.string()
    schema = output_schema(pa.field(id_column, id_type), [first.field(c) for c in cfg.keep_columns])
    return {"files": files, "unreadable": unreadable, "rows_by_file": rows_by_file,
            "rows_in": sum(rows_by_file.values()), "id_column": id_column, "derived_ids": not with_id,
            "schema": schema}


def _file_identity(path: str, rows: int) -> dict:
    identity = {"file": path, "rows": rows}
    if not is_uri(path):
        stat = os.stat(path)
        identity.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return identity


def rows_per_unit(cfg: ScoreConfig, rows_in: int) -> int:
    spread = math.ceil(rows_in / (cfg.pool_size * UNITS_PER_ACTOR)) if rows_in else cfg.unit_rows
    rows = min(cfg.unit_rows, spread)
    return max(cfg.batch_size, math.ceil(rows / cfg.batch_size) * cfg.batch_size)


def make_plan(cfg: ScoreConfig, inputs: dict, adapter: str | None, model: dict) -> dict:
    """What this run will do: the settings a resumed run must share, and the work units."""
    from sentiment_ray.metadata import adapter_identity

    settings = {
        "inputs": [_file_identity(f, inputs["rows_by_file"][f]) for f in inputs["files"]],
        "unreadable_files": [u["file"] for u in inputs["unreadable"]],
        "id_column": inputs["id_column"], "derived_ids": inputs["derived_ids"], "text_column": cfg.text_column,
        "keep_columns": list(cfg.keep_columns),
        "adapter": adapter_identity(adapter) if adapter else None,
        "model": model,
        "prompt": None if adapter else cfg.prompt.to_dict(),
    }
    unit_size = rows_per_unit(cfg, inputs["rows_in"])
    units = plan_units(inputs["files"], unit_size)
    return json.loads(json.dumps({"settings": settings, "rows_per_unit": unit_size,
                                  "units": [u.to_dict() for u in units]}, default=str))


def load_or_start_plan(work: Path, plan: dict) -> dict:
    """A fresh run records its plan; a resumed one must find the same settings, and then uses its stored units."""
    path = work / PLAN_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        changed = [k for k, v in plan["settings"].items() if stored["settings"].get(k) != v]
        if changed:
            raise OutputExistsError(f"cannot resume {work}: the earlier run had other {', '.join(changed)}; rerun "
                                    "with the same inputs and settings, or pass --overwrite to start over")
        return stored
    (work / UNITS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda p: p.write_text(json.dumps(plan) + "\n"))
    return plan


# ---------------------------------------------------------------------------------------------- the job


def _input_error_inside(exc: BaseException) -> InputError | None:
    """The InputError an actor raised, out of the layers Ray and Ray Data wrap around it (the chain of causes
    does not always survive the trip back to the driver; the traceback text does)."""
    found = re.search(r"sentiment_ray\.data\.InputError: (.+)", str(exc))
    if found:
        return InputError(found.group(1).strip())
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InputError):
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def score_pending_units(cfg: ScoreConfig, pending: list[WorkUnit], actor_args: dict) -> Counter:
    """Run the actor pool over the units not yet committed; returns how many units ended how."""
    import ray

    from sentiment_ray.ray_cluster import ensure_ray

    ensure_ray(cfg.ray)
    units = ray.data.from_items([u.to_dict() for u in pending], override_num_blocks=len(pending))
    results = units.map_batches(
        ScoringActor,
        fn_constructor_kwargs=actor_args,
        batch_size=1,  # one unit per call: a retried call redoes one unit, not several
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(cfg.pool_size, len(pending)), max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
    )
    outcomes: Counter = Counter()
    last_report = time.perf_counter()
    try:
        for row in results.iter_rows():
            outcomes[row["outcome"]] += 1
            if time.perf_counter() - last_report >= PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                print(f"[score] {sum(outcomes.values())}/{len(pending)} units done this run", flush=True)
    except Exception as exc:
        user_error = _input_error_inside(exc)
        if user_error is not None:
            raise InputError(str(user_error).splitlines()[0]) from None
        raise
    return outcomes


class PartWriter:
    """Rows appended in order, cut into Parquet files of `rows_per_file` rows (the last one may hold fewer)."""

    def __init__(self, folder: Path, schema: pa.Schema, rows_per_file: int):
        self.folder, self.schema, self.rows_per_file = folder, schema, rows_per_file
        self.writer, self.rows_in_file, self.files = None, 0, 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.folder / f"part-{self.files:05d}.parquet", self.schema)
                self.files += 1
            take = min(table.num_rows, self.rows_per_file - self.rows_in_file)
            self.writer.write_table(table.slice(0, take))
            table, self.rows_in_file = table.slice(take), self.rows_in_file + take
            if self.rows_in_file == self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self.writer is None and self.files == 0:  # no rows at all: one empty file keeps the schema readable
            self.writer = pq.ParquetWriter(self.folder / "part-00000.parquet", self.schema)
            self.files = 1
        if self.writer is not None:
            self.writer.close()
        self.writer, self.rows_in_file = None, 0


def gather_units(plan: dict, work: Path, staging: Path, rows_per_file: int) -> dict:
    """Copy the committed units, in input order, into the output files; every count comes from what is on disk."""
    writer, statuses, truncated, identity = None, Counter(), 0, None
    rows_out = rows_skipped = 0
    skipped_units = []
    for unit in map(WorkUnit.from_dict, plan["units"]):
        if unit_skipped_path(work, unit).exists():
            skipped_units.append(json.loads(unit_skipped_path(work, unit).read_text()))
            rows_skipped += unit.rows
            continue
        if not unit_result_path(work, unit).exists():
            raise RuntimeError(f"{unit.describe()} has no committed result in {work}; rerun with --resume")
        table = pq.read_table(unit_result_path(work, unit))
        if table.num_rows != unit.rows:
            raise RuntimeError(f"{unit_result_path(work, unit)} holds {table.num_rows} rows for {unit.rows} input rows")
        if writer is None:
            writer = PartWriter(staging, table.schema, rows_per_file)
        writer.write(table)
        rows_out += table.num_rows
        statuses.update({e["values"].as_py(): e["counts"].as_py() for e in pc.value_counts(table.column("status"))})
        truncated += pc.sum(table.column("truncated")).as_py() or 0
        identity = identity or table.column("adapter")[0].as_py()
    if writer is not None:
        writer.close()
    return {"rows_out": rows_out, "rows_skipped": rows_skipped, "status_counts": dict(statuses),
            "truncated": truncated, "units_skipped": skipped_units, "wrote_files": writer is not None,
            "adapter": identity}


def run_scoring(cfg: ScoreConfig) -> dict:
    """Score `cfg.input` into `cfg.output` (or finish an earlier run with `cfg.resume`); returns the manifest.
    One run at a time per output: a second one is refused while the first is alive (sentiment_ray/run_lock.py)."""
    with RunLock.for_output(cfg.output):
        return _score_locked(cfg)


def _score_locked(cfg: ScoreConfig) -> dict:
    from sentiment_ray.scorer import check_loadable

    # Every check before open_resumable_output, which with --overwrite drops an unfinished run's work.
    inputs = check_inputs(cfg)
    refuse_overlap(cfg.output, [cfg.input, *inputs["files"]], "score input")
    adapter = str(Path(cfg.adapter).expanduser().resolve()) if cfg.adapter else None
    check_loadable(adapter, cfg.model)  # weights and base model: fail here, before the work folder or any actor
    output = open_resumable_output(cfg.output, cfg.overwrite, cfg.resume, MANIFEST_FILE)
    model = to_dict(cfg.model)
    if model["name_or_path"] and Path(model["name_or_path"]).expanduser().exists():
        model["name_or_path"] = str(Path(model["name_or_path"]).expanduser().resolve())
    if output.finished:
        return _already_finished(output, make_plan(cfg, inputs, adapter, model))
    plan = load_or_start_plan(output.work, make_plan(cfg, inputs, adapter, model))
    units = [WorkUnit.from_dict(u) for u in plan["units"]]
    pending = [u for u in units if not unit_is_done(output.work, u)]
    print(f"[score] {inputs['rows_in']} rows in {len(inputs['files'])} file(s), {len(units)} work units "
          f"({len(units) - len(pending)} already committed) -> {output.final}", flush=True)

    started = time.perf_counter()
    outcomes: Counter = Counter()
    if pending:
        job = {"work_dir": str(output.work), "id_column": inputs["id_column"], "text_column": cfg.text_column,
               "keep_columns": list(cfg.keep_columns), "batch_size": cfg.batch_size,
               "derived_ids": inputs["derived_ids"], "skip_unreadable_files": cfg.skip_unreadable_files,
               "schema": inputs["schema"], "run_id": uuid.uuid4().hex}
        outcomes = score_pending_units(cfg, pending, {
            "adapter": adapter, "model": model, "prompt": cfg.prompt.to_dict(), "job": job,
            "torch_threads": cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor)),
            "max_batch_tokens": cfg.max_batch_tokens,
            "faults": FaultPlan.from_env(str(output.work / FAULT_MARKER)).to_dict(),
        })
    seconds = time.perf_counter() - started
    return _commit(cfg, output, plan, inputs, units, pending, outcomes, seconds)


def _commit(cfg: ScoreConfig, output: ResumableOutput, plan: dict, inputs: dict, units: list[WorkUnit],
            pending: list[WorkUnit], outcomes: Counter, seconds: float) -> dict:
    staging = staging_dir(output.final)
    staging.mkdir()
    counted = gather_units(plan, output.work, staging, cfg.rows_per_file)
    if not counted["wrote_files"]:
        PartWriter(staging, inputs["schema"], cfg.rows_per_file).close()
    rows_in = inputs["rows_in"]
    if counted["rows_out"] + counted["rows_skipped"] != rows_in:
        raise RuntimeError(f"scoring wrote {counted['rows_out']} rows (+{counted['rows_skipped']} skipped) for "
                           f"{rows_in} input rows; partial output left in {staging}")
    scored_now = sum(u.rows for u in pending) - sum(
        u.rows for u in pending if unit_skipped_path(output.work, u).exists())
    status_counts = counted["status_counts"]
    manifest = {
        "rows_in": rows_in,
        "rows_out": counted["rows_out"],
        "rows_scored": status_counts.get(OK_STATUS, 0),
        "rows_marked": counted["rows_out"] - status_counts.get(OK_STATUS, 0),
        "rows_skipped": counted["rows_skipped"],
        "rows_truncated": counted["truncated"],
        "status_counts": status_counts,
        "files_skipped": inputs["unreadable"],
        "units_skipped": counted["units_skipped"],
        "units": {"total": len(units), "committed_before_this_run": len(units) - len(pending),
                  "scored_this_run": outcomes.get("committed", 0) + outcomes.get("already_committed", 0),
                  "skipped_this_run": outcomes.get("skipped", 0), "rows_per_unit": plan["rows_per_unit"]},
        "ids": (f"derived: '<file key>:<row index>' in column {inputs['id_column']!r}" if inputs["derived_ids"]
                else f"input column {inputs['id_column']!r}"),
        "adapter": counted["adapter"],
        "input_files": inputs["files"],
        "seconds": round(seconds, 2),
        # This run's work only: rows scored now over this run's wall time (start-up included).
        "rows_per_second": round(scored_now / seconds, 2) if seconds and scored_now else None,
        "config": to_dict(cfg),
        "plan_settings": plan["settings"],  # what a later --resume on this finished output checks its inputs against
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    commit(staging, output.final, cfg.overwrite, MANIFEST_FILE)
    shutil.rmtree(output.work, ignore_errors=True)
    skipped = (f"; SKIPPED {counted['rows_skipped']} rows in {len(counted['units_skipped'])} unit(s) and "
               f"{len(inputs['unreadable'])} unreadable file(s)") if counted["rows_skipped"] or inputs["unreadable"] else ""
    print(f"[score] {counted['rows_out']} rows into {output.final} ({manifest['rows_scored']} scored, "
          f"{manifest['rows_marked']} marked{skipped}); statuses {status_counts}; this run: "
          f"{len(pending)} units in {seconds:.1f} s ({manifest['rows_per_second']} rows/s, start-up included)",
          flush=True)
    return {**manifest, "output": str(output.final)}


def _already_finished(output: ResumableOutput, plan: dict) -> dict:
    """`--resume` on a finished output: nothing to score, if it was scored from these inputs and settings."""
    manifest = json.loads((output.final / MANIFEST_FILE).read_text())
    recorded = manifest.get("plan_settings")
    if recorded is None:
        raise OutputExistsError(f"output {output.final} is complete, but its manifest predates the record of its "
                                "inputs, so --resume cannot check that it matches them; pass --overwrite to score again")
    changed = [key for key, value in plan["settings"].items() if recorded.get(key) != value]
    if changed:
        raise OutputExistsError(f"output {output.final} is complete, but it was scored from other "
                                f"{', '.join(changed)} than this run's; pass --overwrite to score again, or choose "
                                "a new output")
    shutil.rmtree(output.work, ignore_errors=True)  # left behind if the driver died right after the rename
    print(f"[score] {output.final} is already complete ({manifest['rows_out']} rows); nothing to resume", flush=True)
    return {**manifest, "output": str(output.final)}
