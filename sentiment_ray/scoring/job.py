"""The scoring job: plan on the driver, one streaming Ray Data pipeline, a commit that writes the manifest last.

    check inputs, adapter, output  ->  plan (or the resumed run's)  ->  read -> prepare -> score -> sink
    ->  every unit there exactly once  ->  manifest (the commit marker)

No step of the driver reads or rewrites the scored rows. docs/RESILIENCE.md states the guarantees.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

from sentiment_ray.config import ScoreConfig, to_dict
from sentiment_ray.io.errors import InputError, causes, one_line
from sentiment_ray.io.outputs import OutputExistsError, refuse_overlap
from sentiment_ray.io.run_lock import RunLock, StoreRunLock
from sentiment_ray.io.storage import OutputWriteError, location, refused_mid_run
from sentiment_ray.ops.faults import FaultPlan
from sentiment_ray.ops.logging_setup import level_for_workers
from sentiment_ray.ops.ray_cluster import ResourceRequest
from sentiment_ray.scoring.manifest import ScoreManifest, Timeline, UnitCounts
from sentiment_ray.scoring.node_loss import (
    NodeLost,
    PipelineWatch,
    StageRequest,
    alive_nodes,
    end_pipeline,
    lost_node_inside,
    scoring_actors_that_fit,
    wait_for_room,
)
from sentiment_ray.scoring.output import (
    OutputState,
    ScoreOutput,
    fragments_by_unit,
    open_score_output,
    unit_progress,
)
from sentiment_ray.scoring.plan import ScoreInputs, ScorePlan, check_inputs, make_plan
from sentiment_ray.scoring.progress import ProgressReporter
from sentiment_ray.scoring.sink import (
    OK_STATUS,
    CommittedOutput,
    check_committed,
    fragment_datasink,
)
from sentiment_ray.scoring.stages import (
    PendingRows,
    PrepareStage,
    ReadSpec,
    ScoreStage,
    StageActivity,
    ledger_name,
    prepare_in_task,
    run_ledger,
    unit_datasource,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScoringModel:
    """The model every actor loads: an adapter (local path or URI, with its weights' hash) or zero-shot."""

    adapter: str | None
    weights_sha256: str | None
    identity: str | None
    model: dict
    prompt: dict
    threshold: float  # label/label_id: positive when score >= it


def resolve_model(cfg: ScoreConfig) -> ScoringModel:
    from sentiment_ray.model.metadata import adapter_identity, adapter_weights_sha256, read_metadata
    from sentiment_ray.model.scorer import check_loadable

    adapter = location(cfg.adapter).uri if cfg.adapter else None
    check_loadable(adapter, cfg.model)  # weights and base model: here, before the output is touched or any actor
    model = to_dict(cfg.model)
    if model["name_or_path"] and "://" not in model["name_or_path"]:
        from pathlib import Path

        local = Path(model["name_or_path"]).expanduser()
        if local.exists():
            model["name_or_path"] = str(local.resolve())  # actors run in another working directory
    sha = adapter_weights_sha256(adapter) if adapter else None
    identity = adapter_identity(adapter, sha) if adapter else None
    threshold = cfg.threshold
    if threshold is None and adapter:
        threshold = read_metadata(adapter).threshold
    return ScoringModel(adapter, sha, identity, model, cfg.prompt.to_dict(), 0.5 if threshold is None else threshold)


@dataclasses.dataclass(frozen=True)
class PipelineMilestones:
    """Wall-clock times of the pipeline's start-up, for the manifest's timeline."""

    ray_ready: float
    pipeline_started: float
    scoring_actor_ready: float | None


def run_scoring(cfg: ScoreConfig, started_at: float | None = None) -> ScoreManifest:
    """Score `cfg.input` into `cfg.output` (or finish an earlier run with `cfg.resume` or `cfg.resume_if_exists`);
    returns the manifest. `started_at`: the command's start (time.time()), which the manifest's timeline counts
    from; by default this call.
    One run at a time per output, however it is spelled (sentiment_ray/io/run_lock.py)."""
    started_at = time.time() if started_at is None else started_at
    with RunLock.for_output(cfg.output) as lock:
        return _score(cfg, started_at, lock)


def _timeline(started_at: float, milestones: PipelineMilestones | None, activity: StageActivity | None,
              committed: float) -> Timeline:
    def since_start(wall: float | None) -> float | None:
        return None if wall is None else round(wall - started_at, 3)

    first = last = None
    if milestones and activity and activity.per_actor:  # the actors' offsets count from the pipeline's start
        first = milestones.pipeline_started + min(a.first_batch_offset for a in activity.per_actor)
        last = milestones.pipeline_started + max(a.last_batch_offset for a in activity.per_actor)
    return Timeline(ray_ready=since_start(milestones and milestones.ray_ready),
                    pipeline_started=since_start(milestones and milestones.pipeline_started),
                    scoring_actor_ready=since_start(milestones and milestones.scoring_actor_ready),
                    first_batch=since_start(first), last_batch=since_start(last), committed=since_start(committed))


def _score(cfg: ScoreConfig, started_at: float, lock: RunLock | StoreRunLock | None = None) -> ScoreManifest:
    """check -> open the output -> plan (or the resumed run's) -> pipeline (read -> prepare -> score -> sink) ->
    every unit there exactly once -> the manifest, written last (the commit)."""
    # Every check before open_score_output, which with --overwrite deletes the earlier output.
    inputs = check_inputs(cfg)
    refuse_overlap(cfg.output, [cfg.input, *inputs.paths], "score input")
    scoring_model = resolve_model(cfg)
    # A fresh run (or one with --overwrite, which deletes the earlier output) connects to Ray once the output is
    # known to be free and before it is touched, to refuse what no node can hold first; a resume connects only if
    # rows are left.
    connected: list[float] = []
    output = open_score_output(cfg.output, cfg.overwrite, cfg.resume, cfg.resume_if_exists,
                               before_writing=lambda: connected.append(_connect_ray(cfg)))
    plan = make_plan(cfg, inputs, scoring_model.identity, scoring_model.model, scoring_model.threshold)
    if output.state is OutputState.FINISHED:
        return _already_finished(output, plan)
    plan = _start_or_resume(output, plan)
    pending = _pending_rows(output, plan)
    units_run = len({p.unit_index for p in pending})
    logger.info("%d rows in %d file(s), %d work units (%d already committed) -> %s", inputs.rows_in,
                len(inputs.files), len(plan.units), len(plan.units) - units_run, output.folder)
    started = time.perf_counter()
    written: dict[str, dict] = {}
    activity = milestones = None
    if pending:
        written, activity, milestones = _score_pending(cfg, inputs, plan, pending, scoring_model, output,
                                                       connected[0] if connected else _connect_ray(cfg))
    seconds = time.perf_counter() - started
    if lock is not None:
        lock.verify()  # a run that stalled past its lease and lost the output to another deletes and commits nothing
    committed = check_committed(output, plan.units, written)
    skipped_now = {(r["file_index"], r["start"]) for r in committed.units_skipped}  # the commit read the records
    rows_scored_now = sum(p.rows.rows for p in pending if (p.unit.file_index, p.unit.start) not in skipped_now)
    timeline = _timeline(started_at, milestones, activity, time.time())
    manifest = _manifest(cfg, inputs, plan, committed, units_run, rows_scored_now, seconds, output, activity,
                         timeline)
    with refused_mid_run():  # a store refusing the commit: no manifest, one line, exit 1, --resume commits later
        output.manifest_file.write_bytes(manifest.to_json().encode())  # the commit
    _log_result(manifest, committed, inputs, units_run, seconds, activity)
    return manifest


def _log_result(manifest: ScoreManifest, committed: CommittedOutput, inputs: ScoreInputs, units_run: int,
                seconds: float, activity: StageActivity | None) -> None:
    skipped = (f"; SKIPPED {committed.rows_skipped} rows in {len(committed.units_skipped)} unit(s) and "
               f"{len(inputs.unreadable)} unreadable file(s)") if committed.rows_skipped or inputs.unreadable else ""
    logger.info("%d rows into %s (%d scored, %d marked%s); statuses %s; this run: %d units in %.1f s (%s rows/s, "
                "start-up included)", committed.rows_out, manifest.output, manifest.rows_scored,
                manifest.rows_marked, skipped, dict(committed.status_counts), units_run, seconds,
                manifest.rows_per_second)
    if activity and activity.busy_fraction is not None:
        logger.info("score stage: %d actor(s), %d batches, busy %.0f%% of the time from their first batch to their "
                    "last", activity.actors, activity.batches, 100 * activity.busy_fraction)
        for actor in activity.per_actor:
            logger.info("  scoring actor %s: %d rows in %d batches, busy %.1f s, batches from %.1f s to %.1f s "
                        "after the pipeline started", actor.actor, actor.rows, actor.batches, actor.busy_seconds,
                        actor.first_batch_offset, actor.last_batch_offset)
    if manifest.timeline is not None:
        logger.info("timeline, seconds from the command's start: %s", manifest.timeline.describe())


def _start_or_resume(output: ScoreOutput, plan: ScorePlan) -> ScorePlan:
    """A fresh run records its plan; a resumed one must find the same settings, and then uses its stored units."""
    if output.state is OutputState.UNFINISHED:
        stored = ScorePlan.from_json(output.plan_file.read_text())
        changed = stored.changed_settings(plan)
        if changed:
            raise OutputExistsError(f"cannot resume {output.folder}: the earlier run had other {', '.join(changed)}; "
                                    "rerun with the same inputs and settings, or pass --overwrite to start over")
        return stored
    output.plan_file.write_bytes(plan.to_json().encode())
    return plan


def _already_finished(output: ScoreOutput, plan: ScorePlan) -> ScoreManifest:
    """`--resume` (or `--resume-if-exists`) on a finished output: nothing to score, if it was scored from these
    inputs and settings."""
    manifest = ScoreManifest.from_json(output.manifest_file.read_text(), output.folder.uri)
    recorded = manifest.plan_settings
    if recorded is None:
        raise OutputExistsError(f"output {output.folder} is complete, but its manifest predates the record of its "
                                "inputs, so --resume cannot check that it matches them; "
                                "pass --overwrite to score again")
    changed = ScorePlan(recorded, plan.rows_per_unit).changed_settings(plan)  # names the input files that changed
    if changed:
        raise OutputExistsError(f"output {output.folder} is complete, but it was scored from other "
                                f"{', '.join(changed)} than this run's; pass --overwrite to score again, or choose "
                                "a new output")
    logger.info("%s is already complete (%d rows); nothing to resume", output.folder, manifest.rows_out)
    return manifest


def _pending_rows(output: ScoreOutput, plan: ScorePlan) -> list[PendingRows]:
    """The row ranges this run scores: every unit of a fresh run; on a resume, only the rows of each unit that no
    committed fragment holds (fragments overlapping the kept ones are deleted first, as leftovers)."""
    skipped = {(r["file_index"], r["start"]) for r in output.skipped_records()}
    pending: list[PendingRows] = []
    stale: list = []
    for index, (unit, own) in enumerate(zip(plan.units, fragments_by_unit(plan.units, output.fragments()))):
        if (unit.file_index, unit.start) in skipped:
            continue
        progress = unit_progress(unit, own)
        if progress.complete:
            continue  # its leftovers, if any, go in the commit's check
        stale += progress.stale
        pending += [PendingRows(index, unit, dataclasses.replace(unit, start=start, stop=stop))
                    for start, stop in progress.gaps]
    output.delete_fragments(stale)
    return pending


def _connect_ray(cfg: ScoreConfig) -> float:
    """Ray joined or started, and the job's actors checked against its nodes; returns when (time.time())."""
    from sentiment_ray.ops.ray_cluster import check_requests_fit, ensure_ray

    ensure_ray(cfg.ray)
    check_requests_fit(score_requests(cfg))  # an actor no node can hold would wait with no end
    return time.time()


def _score_pending(cfg: ScoreConfig, inputs: ScoreInputs, plan: ScorePlan, pending: list[PendingRows],
                   scoring_model: ScoringModel, output: ScoreOutput,
                   ray_ready: float) -> tuple[dict[str, dict], StageActivity, PipelineMilestones]:
    """The pending rows through one pipeline; where a node it started on is lost, through a new one sized for the
    nodes left, over the rows that no committed fragment holds yet, as often as nodes are lost (node_loss.py)."""
    import ray

    run_id = uuid.uuid4().hex
    # Held by the driver: it lives as long as this run, across its pipelines, so the stage's activity and the
    # progress line count every pipeline's batches.
    ledger = run_ledger(run_id, output.folder.uri, pending)
    written: dict[str, dict] = {}
    pool = min(cfg.pool_size, len(pending))
    with ProgressReporter(lambda: ray.get(ledger.rows_scored.remote(), timeout=10),
                          sum(p.rows.rows for p in pending)):
        while pending:
            try:
                written.update(_run_pipeline(cfg, inputs, plan, pending, scoring_model, output, run_id, pool))
                break
            except NodeLost as lost:
                pending, pool = _reform_after(lost, cfg, output, plan)
    activity = ray.get(ledger.activity.remote())
    pipeline_started, actor_ready = ray.get(ledger.milestones.remote())
    return written, activity, PipelineMilestones(ray_ready, pipeline_started, actor_ready)


def _stage_requests(cfg: ScoreConfig) -> list[StageRequest]:
    scoring, tokenizing = score_requests(cfg)
    return [StageRequest.of("ScoreStage", scoring), StageRequest.of("PrepareStage", tokenizing)]


def _reform_after(lost: NodeLost, cfg: ScoreConfig, output: ScoreOutput,
                  plan: ScorePlan) -> tuple[list[PendingRows], int]:
    """After a lost node: once the nodes left (or joined) hold one actor of each stage, the rows still pending and
    the scoring actors for the next pipeline. Raises ClusterTooSmallError after ray.wait_for_resources_s."""
    requests = _stage_requests(cfg)
    logger.warning("%s; the pipeline stopped, to go on with the nodes left", lost)
    nodes = wait_for_room(requests, cfg.ray.wait_for_resources_s, lost)
    pending = _pending_rows(output, plan)  # as --resume: the fragments committed so far stay, the rest is redone
    pool = scoring_actors_that_fit(requests[0], list(nodes.values()), min(cfg.pool_size, max(1, len(pending))))
    logger.warning("re-forming the pipeline on %d node(s): %d scoring actor(s), %d rows in %d piece(s) still to "
                   "score", len(nodes), pool, sum(p.rows.rows for p in pending), len(pending))
    return pending, pool


def _run_pipeline(cfg: ScoreConfig, inputs: ScoreInputs, plan: ScorePlan, pending, scoring_model: ScoringModel,
                  output: ScoreOutput, run_id: str, pool: int) -> dict[str, dict]:
    """One streaming pipeline over `pending` with `pool` scoring actors; returns the fragments it wrote. Raises
    NodeLost where a node it started on is lost."""
    import ray

    nodes_at_start = set(alive_nodes())
    spec = ReadSpec(inputs.id_column, cfg.text_column, tuple(cfg.keep_columns), inputs.derived_ids,
                    cfg.skip_unreadable_files, inputs.schema, output.folder.uri)
    log_level = level_for_workers()  # the workers log at the driver's level (-v, -q, SENTIMENT_RAY_LOG_LEVEL)
    model_args = {"adapter": scoring_model.adapter, "weights_sha256": scoring_model.weights_sha256,
                  "model": scoring_model.model, "prompt": scoring_model.prompt, "log_level": log_level}
    faults = FaultPlan.from_env(default_marker=_fault_marker(output))
    dataset = ray.data.read_datasource(unit_datasource(pending, spec, cfg.batch_size * 4, log_level),
                                       override_num_blocks=len(pending), num_cpus=cfg.io_cpus)
    prepare_actors, prepare_cpus = _prepare_pool(cfg, pool)
    prepare_args = {**model_args, "fail_text": faults.fail_text}
    if prepare_actors == 0:  # tasks: each worker process keeps its tokenizer (stages.prepare_in_task)
        dataset = dataset.map_batches(prepare_in_task, fn_kwargs=prepare_args, batch_size=cfg.batch_size,
                                      batch_format="pyarrow", num_cpus=prepare_cpus)
    else:
        dataset = dataset.map_batches(
            PrepareStage, fn_constructor_kwargs=prepare_args,
            batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=prepare_cpus,
            # Started at full size: grown by Ray Data's autoscaler from one actor, the pool was still adding
            # tokenizers 10 s into a job whose scoring was paced by tokenizing (docs/BENCHMARKS.md §16). It may
            # shrink to one where the cluster loses CPUs.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=prepare_actors, initial_size=prepare_actors))
    dataset = dataset.map_batches(
        ScoreStage, fn_constructor_kwargs={
            **model_args, "max_batch_tokens": cfg.max_batch_tokens,
            "torch_threads": cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor)), "run_id": run_id,
            "threshold": scoring_model.threshold, "forward": cfg.forward, "run": output.folder.uri,
            "files": inputs.paths, "unit_files": [u.file_index for u in plan.units], "faults": faults.to_dict()},
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor, resources=cfg.actor_resources or None,
        # A fixed size, not an autoscaling pool: Ray Data shrinks a pool only by idle actors, and a scoring actor
        # that died with its node holds its batches while it waits to restart, so a smaller pool would not free it;
        # after a lost node the pipeline re-forms with the actors that fit the nodes left (node_loss.py).
        compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=cfg.batches_in_flight))
    sink = fragment_datasink(output.folder.uri, inputs.schema, {p.unit_index: p.unit for p in pending},
                             plan.rows_per_unit, ledger_name(run_id), faults.to_dict())
    # Watched on the executor's own loop: a node lost mid-run stops this pipeline rather than leaving it to wait
    # for an actor that cannot be placed again.
    from sentiment_ray.scoring.lost_node_callback import watching  # imports Ray Data's internals

    with watching(dataset, nodes_at_start) as watch:
        try:
            # Writes reserve no CPU. Ray Data reserves CPUs for operators upstream first, so on a node whose CPUs
            # the actor pools hold, a write task that asked for a share waited until every read was done (seen on
            # 3 logical CPUs): rows piled up in the object store and nothing was committed until the end.
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0})
        except Exception as exc:
            _raise_known_error(exc, watch)
            raise
    return {w["fragment"]: w for w in sink.written}


def _raise_known_error(exc: Exception, watch: PipelineWatch) -> None:
    """A failed pipeline's error as the command reports it, where it is one it knows: the user's input, a refused
    write, a lost node. Returns for any other. First, whatever stopped the pipeline (those, or a bug), its actors
    and writes are ended: left to Ray Data, a failed execution only drops its pools' handles, and the raised
    error's traceback keeps them, so in a notebook or a test that holds the error the actors lived on with their
    CPUs (a GPU, on a cluster) and the next run in the same process waited for them forever."""
    logger.debug("the pipeline stopped", exc_info=True)
    end_pipeline(watch)
    # A refused write first: the StorageError it may carry among its causes is an InputError too
    write_error = _write_error_inside(exc)
    if write_error is not None:  # a full disk: one line, exit 1; the fragments written so far stay for --resume
        logger.debug("a write task failed", exc_info=True)
        raise write_error from None
    user_error = _input_error_inside(exc)
    if user_error is not None:
        raise user_error from None
    lost = lost_node_inside(exc, watch.nodes_at_start)
    if lost is not None:
        raise lost from None


def _prepare_pool(cfg: ScoreConfig, scoring_actors: int) -> tuple[int, float]:
    """(largest size, CPUs per actor) of the CPU tokenizing pool: as set, else as many actors as the cluster's CPUs
    left after the scoring actors and the read/write tasks allow. On a small node that leaves less than a CPU,
    the one actor gets what is left: asking for more would starve the read tasks, and the job would hang. With
    prepare_actors 0 (tasks), size 0 and the CPUs each task asks for, shrunk the same way."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    left = cpus - scoring_actors * cfg.num_cpus_per_actor - 2 * cfg.io_cpus
    each = cfg.num_cpus_per_prepare_actor
    if cfg.prepare_actors:
        return cfg.prepare_actors, each
    tasks = cfg.prepare_actors == 0  # (0, CPUs per task): Ray Data runs as many tasks as the CPUs left allow
    if left < each:
        return (0 if tasks else 1), max(min(each, left), 0.1)
    return (0 if tasks else max(1, int(left // max(each, 0.01)))), each


def score_requests(cfg: ScoreConfig) -> list[ResourceRequest]:
    """What each actor of the two pools asks Ray for, as the pipeline will ask it (the tokenizing pool's CPUs
    are those _prepare_pool sizes it with)."""
    scoring = {"CPU": cfg.num_cpus_per_actor, "GPU": cfg.num_gpus_per_actor, **cfg.actor_resources}
    settings = {"CPU": "num_cpus_per_actor", "GPU": "num_gpus_per_actor",
                **{name: f"actor_resources.{name}" for name in cfg.actor_resources}}
    _, prepare_cpus = _prepare_pool(cfg, cfg.pool_size)
    return [ResourceRequest("each scoring actor", scoring, settings),
            ResourceRequest("each tokenizing actor", {"CPU": prepare_cpus}, {"CPU": "num_cpus_per_prepare_actor"})]


def _fault_marker(output: ScoreOutput) -> str:
    import hashlib
    import tempfile

    digest = hashlib.sha256(output.folder.uri.encode()).hexdigest()[:12]
    return f"{tempfile.gettempdir()}/sentiment-ray-fault-{digest}"


def _input_error_inside(exc: BaseException) -> InputError | None:
    """The InputError a task or actor raised, out of the layers Ray and Ray Data wrap around it (the chain of
    causes does not always survive the trip back to the driver; the traceback text does)."""
    import re

    found = re.search(re.escape(f"{InputError.__module__}.{InputError.__name__}: ") + "(.+)", str(exc))
    if found:
        return InputError(found.group(1).strip().splitlines()[0])
    for current in causes(exc):
        if isinstance(current, InputError):
            return InputError(str(current).splitlines()[0])
    return None


def _write_error_inside(exc: BaseException) -> OutputWriteError | None:
    """The OutputWriteError (a full disk, a quota, a read-only filesystem) a write task raised, out of Ray's and
    Ray Data's wrapping, as _input_error_inside finds an InputError; an OSError of that kind that reached no
    Location.write_with is named by its errno alone."""
    import re

    from sentiment_ray.io.storage import WRITE_REFUSED_ERRNOS

    found = re.search(re.escape(f"{OutputWriteError.__module__}.{OutputWriteError.__name__}: ") + "(.+)", str(exc))
    if found:
        return OutputWriteError(found.group(1).strip().splitlines()[0])
    for current in causes(exc):
        if isinstance(current, OutputWriteError):
            return OutputWriteError(str(current).splitlines()[0])
        if isinstance(current, OSError) and current.errno in WRITE_REFUSED_ERRNOS:
            return OutputWriteError(f"could not write the scored rows: {one_line(current)}")
    return None


def _manifest(cfg: ScoreConfig, inputs: ScoreInputs, plan: ScorePlan, committed: CommittedOutput, units_run: int,
              rows_scored_now: int, seconds: float, output: ScoreOutput,
              activity: StageActivity | None, timeline: Timeline) -> ScoreManifest:
    statuses = dict(committed.status_counts)
    return ScoreManifest(
        output=output.folder.uri,
        rows_in=inputs.rows_in,
        rows_out=committed.rows_out,
        rows_scored=statuses.get(OK_STATUS, 0),
        rows_marked=committed.rows_out - statuses.get(OK_STATUS, 0),
        rows_skipped=committed.rows_skipped,
        rows_truncated=committed.truncated,
        status_counts=statuses,
        files_skipped=inputs.unreadable,
        units_skipped=committed.units_skipped,
        units=UnitCounts(total=len(plan.units), committed_before_this_run=len(plan.units) - units_run,
                         scored_this_run=units_run, rows_per_unit=plan.rows_per_unit, fragments=committed.fragments),
        ids=(f"derived: '<file key>:<row index>' in column {inputs.id_column!r}" if inputs.derived_ids
             else f"input column {inputs.id_column!r}"),
        adapter=committed.adapter,
        input_files=inputs.paths,
        seconds=round(seconds, 2),
        rows_scored_this_run=rows_scored_now,
        rows_per_second=round(rows_scored_now / seconds, 2) if seconds and rows_scored_now else None,
        score_stage=activity,
        config=to_dict(cfg),
        plan_settings=plan.settings,
        files_written=committed.files,
        timeline=timeline,
        quantization=ScoreManifest.applied_quantization(activity),
    )
