"""The stages of the scoring pipeline, each a Ray Data operator on the resources it needs.

    read (CPU tasks)       prepare (CPU actors/tasks)    score (GPU actors)                  sink (CPU tasks)
    one task per unit  ->  clean, clip, tokenize by  ->  length-sorted forwards, the two  ->  fragments
    any pyarrow fs         the adapter's prompt;         label logits; several batches        (sink.py)
                           bad rows marked               in flight per actor

Every row carries its work unit (`__unit`, its index in the plan) and its position in its input file (`__row`)
from the read to the sink, and every stage returns exactly one row per row it was given, so the sink can name
each fragment by the rows it holds. Token ids are what crosses from prepare to score: the GPU actor never
tokenizes. Modelled on ray.data.llm's processors (a chain of map_batches stages split by resource).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentiment_ray.io.errors import InputError, one_line
from sentiment_ray.io.inputs import unvalidated_type
from sentiment_ray.ops.faults import FaultPlan
from sentiment_ray.ops.logging_setup import configure_worker_logging
from sentiment_ray.ops.metrics import ScoreStageRecorder
from sentiment_ray.scoring.work_units import WorkUnit, derived_ids, read_unit

logger = logging.getLogger(__name__)

UNIT_COLUMN = "__unit"
ROW_COLUMN = "__row"
TEXT_BYTES_COLUMN = "__text"  # the text as bytes (never validated by pyarrow), null where it is no text
NOT_TEXT_COLUMN = "__not_text"  # the cell held a value of another type (a number, ...): non_string_text
TOKENS_COLUMN = "__input_ids"
FAULT_COLUMN = "__inject_failure"  # test hook SENTIMENT_RAY_FAULT_FAIL_TEXT, decided where the text is seen
STATUS_PENDING = None  # status of a prepared row that the score stage still has to score
# A batch whose scoring kills its actor this many times in one run (a row that crashes the process, not just
# raises) ends the job naming its rows, rather than being retried by Ray forever.
BATCH_ATTEMPTS = 4
ACTOR_PROGRESS_EVERY_S = 30.0  # each scoring actor's own debug line; the driver logs the run's (progress.py)


# ------------------------------------------------------------------------------------------------ read


@dataclass(frozen=True)
class ReadSpec:
    id_column: str
    text_column: str
    keep_columns: tuple[str, ...]
    derived_ids: bool
    skip_unreadable_files: bool
    schema: pa.Schema  # the output's: ids and kept columns are cast to it, so every block has one schema
    output: str  # where a skipped unit's record goes


def _text_as_bytes(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(bytes or null per row, True where the cell held a non-text value): one schema for every input file,
    whatever type its text column has, and no UTF-8 validation on the way to the prepare stage."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    binary = unvalidated_type(column.type)
    if binary is None:  # numbers, ...: every non-null cell is marked non_string_text
        return pa.nulls(len(column), pa.large_binary()), pc.fill_null(column.is_valid(), False)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.cast(binary).cast(pa.large_binary()), pa.array(np.zeros(len(column), dtype=bool))


@dataclass(frozen=True)
class PendingRows:
    """Rows a run still has to score: a whole work unit, or (on a resume) a gap between its committed fragments."""

    unit_index: int
    unit: WorkUnit  # the plan's unit: what a skip record names
    rows: WorkUnit  # the row range to read: the unit itself or part of it


def read_unit_blocks(pending: PendingRows, spec: ReadSpec, rows_per_block: int, log_level: int | None = None):
    """The pending rows of one work unit as blocks of at most `rows_per_block` rows."""
    from sentiment_ray.io.storage import location, refused_mid_run

    configure_worker_logging(log_level)
    piece = pending.rows
    try:
        table = read_unit(piece, [spec.id_column, spec.text_column, *spec.keep_columns])
    except Exception as exc:  # noqa: BLE001 - any read failure is reported with the file and rows
        message = f"{piece.describe()}: unreadable ({type(exc).__name__}: {one_line(exc)})"
        if not spec.skip_unreadable_files:
            raise InputError(f"{message}; pass --skip-unreadable-files to skip and report it instead") from None
        from sentiment_ray.scoring.output import SKIPPED_PREFIX

        unit = pending.unit  # the whole unit is reported skipped, whatever part of it this run had left
        record = {**asdict(unit), "rows": unit.rows, "error": message}
        with refused_mid_run():
            location(spec.output).join(f"{SKIPPED_PREFIX}{unit.name}.json").write_bytes(json.dumps(record).encode())
        logger.warning("skipped %s", message)
        return
    ids = derived_ids(piece) if spec.derived_ids else table.column(spec.id_column)
    columns = {spec.id_column: ids, **{name: table.column(name) for name in spec.keep_columns}}
    kept = pa.table({name: values.cast(spec.schema.field(name).type) for name, values in columns.items()})
    text, not_text = _text_as_bytes(table.column(spec.text_column))
    block = kept.append_column(TEXT_BYTES_COLUMN, text).append_column(NOT_TEXT_COLUMN, not_text)
    block = block.append_column(UNIT_COLUMN, pa.array(np.full(piece.rows, pending.unit_index, dtype=np.int32)))
    block = block.append_column(ROW_COLUMN, pa.array(np.arange(piece.start, piece.stop, dtype=np.int64)))
    for start in range(0, block.num_rows, rows_per_block):
        yield block.slice(start, rows_per_block)


def unit_datasource(pending: list[PendingRows], spec: ReadSpec, rows_per_block: int, log_level: int | None = None):
    """A Ray Data Datasource with one read task per pending row range, on any pyarrow filesystem."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class WorkUnitDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(p.rows.rows for p in pending) * 2048

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(partial(read_unit_blocks, p, spec, rows_per_block, log_level),
                             BlockMetadata(num_rows=p.rows.rows, size_bytes=p.rows.rows * 2048, exec_stats=None,
                                           input_files=[p.rows.file]))
                    for p in pending]

        def get_name(self) -> str:
            return "WorkUnits"

    return WorkUnitDatasource()


# ------------------------------------------------------------------------------------------------ prepare


class PrepareStage:
    """CPU actor: the adapter's tokenizer and prompt spec, loaded once; each batch cleaned, clipped and
    tokenized, bad rows marked with their status."""

    def __init__(self, adapter: str | None, weights_sha256: str | None, model: dict, prompt: dict,
                 fail_text: str | None = None, log_level: int | None = None):
        configure_worker_logging(log_level)
        from sentiment_ray.config import ScoringModelConfig
        from sentiment_ray.model.prompt import PromptSpec
        from sentiment_ray.model.scorer import TextPreparer

        self.preparer = TextPreparer.load(adapter, weights_sha256, ScoringModelConfig(**model),
                                          PromptSpec.from_dict(prompt))
        self.fail_text = fail_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [None if v is None else v.decode("utf-8", "surrogateescape")
                 for v in batch.column(TEXT_BYTES_COLUMN).to_pylist()]
        not_text = batch.column(NOT_TEXT_COLUMN).to_pylist()
        prepared = self.preparer.prepare([1 if odd else t for t, odd in zip(texts, not_text)])  # 1: not text
        out = batch.drop_columns([TEXT_BYTES_COLUMN, NOT_TEXT_COLUMN])
        out = out.append_column(TOKENS_COLUMN, pa.array(prepared.input_ids, pa.list_(pa.int32())))
        out = out.append_column("status", pa.array(prepared.statuses, pa.string()))
        out = out.append_column("truncated", pa.array(prepared.truncated, pa.bool_()))
        out = out.append_column("error", pa.array(prepared.errors, pa.string()))
        if self.fail_text:
            out = out.append_column(FAULT_COLUMN, pa.array([t is not None and self.fail_text in t for t in texts]))
        return out


def prepare_in_task(batch: pa.Table, **stage_args) -> pa.Table:
    """The prepare stage as Ray tasks (`prepare_actors: 0`) rather than an actor pool: no tokenizing actor to
    start and no CPU held between batches. Ray reuses its worker processes for tasks, so each process loads a
    tokenizer once (on its first batch of a job) and keeps it for the next tasks, of this job and of later ones in
    the same Ray (a notebook, a test session: the start of a tokenizing actor, ~5 CPU-seconds, once per worker
    rather than once per run)."""
    return _prepare_stage(json.dumps(stage_args, sort_keys=True))(batch)


@lru_cache(maxsize=4)  # a worker that serves several jobs (adapters) keeps a few
def _prepare_stage(stage_args: str) -> PrepareStage:
    return PrepareStage(**json.loads(stage_args))


# ------------------------------------------------------------------------------------------------ score


@dataclass(frozen=True)
class ActorActivity:
    """One scoring actor's share of a run. The offsets are wall-clock seconds from the start of the run's pipeline
    to the actor's first batch starting and its last batch ending: they show how staggered the actors started
    (their model loads) and how unevenly they finished. Actors on other nodes are as exact as the nodes' clocks
    agree."""

    actor: str  # node id prefix - pid
    batches: int
    rows: int
    busy_seconds: float
    first_batch_offset: float
    last_batch_offset: float
    ready_offset: float | None = None  # the actor's model loaded (and compiled): its constructor done
    load_seconds: float | None = None  # of which loading the model and adapter (and the warm-up compile)
    forward: str | None = None  # the forward it ran: the config's, or eager where that one could not run here
    compile_cache: str | None = None  # whether its compile was loaded from the compile cache (compile_cache.py)
    # model.quantization as the actor applied it: "none", "fp8_rowwise", or "none (fp8 unavailable: why)"
    quantization: str | None = None


@dataclass(frozen=True)
class StageActivity:
    """How busy the score stage's actors were: time inside their batches over the time from each actor's first
    batch to its last (start-up and the tail excluded). Near 1: the stages before it kept it fed."""

    actors: int
    batches: int
    busy_seconds: float
    active_seconds: float
    busy_fraction: float | None
    # CUDA graph captures or compiles inside the actors' batches (ScoreConfig.forward), summed over actors; part of
    # busy. The warm-up compile as an actor loads is not: it is in its load_seconds (per_actor).
    capture_seconds: float = 0.0
    per_actor: list[ActorActivity] = field(default_factory=list)  # by first batch

    @classmethod
    def from_dict(cls, data: dict) -> StageActivity:
        """As `dataclasses.asdict` wrote it; a manifest from before `per_actor` has none."""
        return cls(**{**data, "per_actor": [ActorActivity(**a) for a in data.get("per_actor") or ()]})


class RunLedger:
    """A small actor of one driver run. It counts how often scoring a batch was started and not finished: within
    one run a batch is started again only after the actor scoring it died; it dies with the driver, so a killed
    driver's attempts never count against a batch. It adds up the score stage's busy time (StageActivity) and the
    rows of finished batches, for the driver's progress line. And it hears from the sink which fragments were
    written, to count the units completed (the units-committed metric, tagged with `run`): no write task sees all
    of a unit's fragments, the ledger does."""

    def __init__(self, run: str | None = None, pending: list[PendingRows] = ()):
        from sentiment_ray.scoring.output import UnitCommits

        self.open: dict[tuple[int, int], int] = {}
        self.actors: dict[str, _ActorSpan] = {}
        self.batches = 0
        self.created = time.time()  # the run's pipeline starts with its ledger: actor offsets count from here
        self.run = run
        left: dict[int, list[WorkUnit]] = {}
        for rows in pending:
            left.setdefault(rows.unit_index, []).append(rows.rows)
        self.commits = UnitCommits(left)
        self.finished: set[tuple[int, int]] = set()  # a batch finished twice (its actor died after) counts once
        self.rows_finished = 0
        self.ready: dict[str, dict] = {}  # per scoring actor: when its model was loaded, the forward it runs

    def actor_ready(self, actor: str, wall_ready: float, load_seconds: float, forward: str,
                    compile_cache: str | None, quantization: str | None = None) -> None:
        self.ready[actor] = {"wall_ready": wall_ready, "load_seconds": round(load_seconds, 3), "forward": forward,
                             "compile_cache": compile_cache, "quantization": quantization}

    def begin(self, key: tuple[int, int]) -> int:
        self.open[key] = self.open.get(key, 0) + 1
        return self.open[key]

    def end(self, key: tuple[int, int], actor: str | None = None, started: float = 0.0, ended: float = 0.0,
            capture_seconds: float = 0.0, rows: int = 0, wall_ended: float | None = None) -> None:
        self.open.pop(key, None)
        if rows and key not in self.finished:
            self.finished.add(key)
            self.rows_finished += rows
        if actor is not None:  # busy time from the actor's monotonic clock; its span from the wall clock
            wall_ended = time.time() if wall_ended is None else wall_ended
            self.actors.setdefault(actor, _ActorSpan()).add(ended - started, wall_ended, capture_seconds, rows)
            self.batches += 1

    def fragments_written(self, fragments: list[tuple[int, int, int, int]]) -> None:
        """(unit index, file index, first row, end row) of fragments a write task wrote."""
        from sentiment_ray.ops.metrics import record_units_committed
        from sentiment_ray.scoring.output import Fragment

        completed = sum(self.commits.add(unit, Fragment(file, start, stop)) for unit, file, start, stop in fragments)
        if self.run is not None:
            record_units_committed(self.run, completed)

    def rows_scored(self) -> int:
        """Rows of the batches the score stage has finished in this run (marked rows included)."""
        return self.rows_finished

    def activity(self) -> StageActivity:
        busy = sum(s.busy for s in self.actors.values())
        active = sum(s.wall_last - s.wall_first for s in self.actors.values())
        per_actor = sorted((ActorActivity(name, s.batches, s.rows, round(s.busy, 3),
                                          round(s.wall_first - self.created, 3), round(s.wall_last - self.created, 3),
                                          **self._readiness(name))
                            for name, s in self.actors.items()), key=lambda a: a.first_batch_offset)
        return StageActivity(len(self.actors), self.batches, round(busy, 3), round(active, 3),
                             round(busy / active, 4) if active else None,
                             round(sum(s.capture for s in self.actors.values()), 3), per_actor)

    def _readiness(self, actor: str) -> dict:
        ready = self.ready.get(actor)
        if ready is None:
            return {}
        return {"ready_offset": round(ready["wall_ready"] - self.created, 3), "load_seconds": ready["load_seconds"],
                "forward": ready["forward"], "compile_cache": ready["compile_cache"],
                "quantization": ready.get("quantization")}

    def milestones(self) -> tuple[float, float | None]:
        """(the pipeline's start, the first scoring actor's model loaded), by the wall clock."""
        return self.created, min((r["wall_ready"] for r in self.ready.values()), default=None)


@dataclass
class _ActorSpan:
    """A scoring actor's batches so far, as the ledger adds them up."""

    wall_first: float = math.inf  # its first batch's start and its last batch's end, by the wall clock
    wall_last: float = -math.inf
    busy: float = 0.0
    capture: float = 0.0
    batches: int = 0
    rows: int = 0

    def add(self, seconds: float, wall_ended: float, capture_seconds: float, rows: int) -> None:
        self.wall_first = min(self.wall_first, wall_ended - seconds)
        self.wall_last = max(self.wall_last, wall_ended)
        self.busy += seconds
        self.capture = max(self.capture, capture_seconds)  # the actor's running total
        self.batches += 1
        self.rows += rows


def ledger_name(run_id: str) -> str:
    return f"sentiment-ray-ledger-{run_id}"


def run_ledger(run_id: str, run: str | None = None, pending: list[PendingRows] = ()):
    """The ledger of driver run `run_id`; `run` tags its metrics, `pending` are the rows the run has to write."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a 0-CPU actor may otherwise be placed on any node, and the loss of a worker node (the
    # very failure the ledger is there for) would take it along and fail every scoring actor that asks it.
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(RunLedger).options(
        name=ledger_name(run_id), get_if_exists=True, lifetime=None,
        scheduling_strategy=driver_node).remote(run, list(pending))


def _token_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row's token ids as a numpy view into the Arrow list column (no Python int per token)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    return [flat[end - length:end] for end, length in zip(ends, lengths)]


class ScoreStage:
    """GPU (or CPU) actor: base model + adapter loaded once; each batch's prepared rows scored in length-sorted
    forwards. Rows marked by the prepare stage pass through with their status."""

    def __init__(self, adapter: str | None, weights_sha256: str | None, model: dict, prompt: dict,
                 max_batch_tokens: int | None, torch_threads: int | None, run_id: str, files: list[str],
                 unit_files: list[int], faults: dict | None = None, threshold: float = 0.5, forward: str = "eager",
                 run: str = "", log_level: int | None = None):
        configure_worker_logging(log_level)
        import ray
        import torch

        from sentiment_ray.config import ScoringModelConfig
        from sentiment_ray.model.prompt import PromptSpec
        from sentiment_ray.model.scorer import SentimentScorer

        if torch_threads and not torch.cuda.is_available():
            torch.set_num_threads(torch_threads)  # Ray pins OMP threads to the reserved CPUs; say it explicitly
        loading = time.perf_counter()
        # Loading includes the warm-up compile of compiled forwards (SentimentScorer.warm_up): Ray Data starts this
        # actor with the pipeline, so the load and compile run while the read and tokenizing stages fill its queue.
        self.scorer = SentimentScorer.load(adapter, ScoringModelConfig(**model), PromptSpec.from_dict(prompt),
                                           max_batch_tokens, weights_sha256=weights_sha256, forward=forward)
        load_seconds = time.perf_counter() - loading
        cache = self.scorer.compile_cache
        logger.info("scoring actor pid %d: %s loaded on %s in %.1f s, forward %s, quantization %s%s", os.getpid(),
                    self.scorer.identity, self.scorer.device, load_seconds, self.scorer.forward_mode,
                    self.scorer.quantization, f", compile {cache.describe()}" if cache else "")
        self.ledger = ray.get_actor(ledger_name(run_id))
        self.actor_name = f"{ray.get_runtime_context().get_node_id()[:12]}-{os.getpid()}"
        self.ledger.actor_ready.remote(self.actor_name, time.time(), load_seconds, self.scorer.forward_mode,
                                       cache.describe() if cache else None, self.scorer.quantization)
        self.capture_at_ready = self.scorer.capture_seconds  # the warm-up's compile, which no batch waited for
        self.files, self.unit_files = files, unit_files  # to name the rows of a batch that keeps killing its actor
        self.faults = FaultPlan(**(faults or {}))
        self.threshold = threshold
        self.batches_done = self.rows_done = 0
        self.started = self.last_report = time.perf_counter()
        self.metrics = ScoreStageRecorder(run)  # `run`: the output's URI, the tag of the job's metrics

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from sentiment_ray.model.scorer import score_with_retry

        started = time.perf_counter()
        key = (int(batch.column(UNIT_COLUMN)[0].as_py()), int(batch.column(ROW_COLUMN)[0].as_py()))
        attempts = ray.get(self.ledger.begin.remote(key))
        if attempts > BATCH_ATTEMPTS:
            raise InputError(f"{self.files[self.unit_files[key[0]]]} rows {key[1]}-{key[1] + batch.num_rows - 1}: "
                             f"{BATCH_ATTEMPTS} attempts in "
                             "this run ended with the scoring process dying; a row there crashes the process "
                             "(memory?). Fix or remove it, then rerun with --resume")
        statuses = batch.column("status").to_pylist()
        pending = [i for i, s in enumerate(statuses) if s is STATUS_PENDING]
        tokens = _token_rows(batch.column(TOKENS_COLUMN))
        fault = batch.column(FAULT_COLUMN).to_pylist() if FAULT_COLUMN in batch.column_names else [False] * len(tokens)
        result = score_with_retry(self._score, [(tokens[i], fault[i]) for i in pending], on_retry=logger.warning)
        scores = [None] * batch.num_rows
        errors = batch.column("error").to_pylist()
        for i, score, status, error in zip(pending, result.scores, result.statuses, result.errors):
            scores[i], statuses[i], errors[i] = score, status, error
        label_ids = [None if s is None else int(s >= self.threshold) for s in scores]
        from sentiment_ray.model.labels import CLASS_NAMES

        out = batch.drop_columns([c for c in (TOKENS_COLUMN, FAULT_COLUMN, "status", "error")
                                  if c in batch.column_names])
        out = out.append_column("label", pa.array([None if i is None else CLASS_NAMES[i] for i in label_ids],
                                                  pa.string()))
        out = out.append_column("label_id", pa.array(label_ids, pa.int8()))
        out = out.append_column("score", pa.array(scores, pa.float64()))
        out = out.append_column("status", pa.array(statuses, pa.string()))
        out = out.append_column("adapter", pa.array([self.scorer.identity] * batch.num_rows, pa.string()))
        out = out.append_column("error", pa.array(errors, pa.string()))
        ended = time.perf_counter()
        self.ledger.end.remote(key, self.actor_name, started, ended,
                               self.scorer.capture_seconds - self.capture_at_ready, rows=batch.num_rows,
                               wall_ended=time.time())
        self.metrics.record_batch(statuses, started, ended)
        logger.debug("scored a batch of %d rows (unit %d, rows from %d) in %.2f s", batch.num_rows, key[0], key[1],
                     ended - started)
        self.batches_done += 1
        self._report_progress(batch.num_rows)
        self.faults.maybe_exit(self.batches_done)
        return out

    def _score(self, rows: list[tuple[list[int], bool]]):
        from sentiment_ray.model.scorer import STATUS_OK, BatchScores

        if self.faults.fail_text and any(flag for _, flag in rows):
            from sentiment_ray.ops.faults import FAIL_TEXT, InjectedFault

            raise InjectedFault(f"injected failure for a batch holding {self.faults.fail_text!r} ({FAIL_TEXT})")
        self.faults.maybe_stall()
        scores = self.scorer.score_token_ids([ids for ids, _ in rows])
        return BatchScores(scores, [STATUS_OK] * len(scores), [False] * len(scores))

    def _report_progress(self, rows: int) -> None:
        self.rows_done += rows
        now = time.perf_counter()
        if now - self.last_report >= ACTOR_PROGRESS_EVERY_S:
            self.last_report = now
            logger.debug("scoring actor %s: %d rows (%.1f rows/s)", os.getpid(), self.rows_done,
                         self.rows_done / (now - self.started))
