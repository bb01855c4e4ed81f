"""The scoring job: plan on the driver, one streaming Ray Data pipeline, a commit that writes the manifest last.

    check inputs, adapter, output  ->  plan (or the resumed run's)  ->  read -> prepare -> score -> sink
    ->  every unit there exactly once  ->  manifest (the commit marker)

No step of the driver reads or rewrites the scored rows. docs/RESILIENCE.md states the guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid

from sentiment_ray.config import ScoreConfig, to_dict
from sentiment_ray.data import InputError
from sentiment_ray.faults import FaultPlan
from sentiment_ray.outputs import OutputExistsError, refuse_overlap
from sentiment_ray.run_lock import RunLock
from sentiment_ray.scoring.output import (
    OutputState,
    ScoreOutput,
    open_score_output,
    tile,
)
from sentiment_ray.scoring.plan import ScoreInputs, ScorePlan, check_inputs, make_plan
from sentiment_ray.scoring.sink import (
    OK_STATUS,
    CommittedOutput,
    check_committed,
    fragment_datasink,
)
from sentiment_ray.scoring.stages import (
    PrepareStage,
    ReadSpec,
    ScoreStage,
    attempt_ledger,
    unit_datasource,
)
from sentiment_ray.storage import location

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScoringModel:
    """The model every actor loads: an adapter (local path or URI, with its weights' hash) or zero-shot."""

    adapter: str | None
    weights_sha256: str | None
    identity: str | None
    model: dict
    prompt: dict


def resolve_model(cfg: ScoreConfig) -> ScoringModel:
    from sentiment_ray.metadata import adapter_identity, adapter_weights_sha256
    from sentiment_ray.scorer import check_loadable

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
    return ScoringModel(adapter, sha, identity, model, cfg.prompt.to_dict())


def run_scoring(cfg: ScoreConfig) -> dict:
    """Score `cfg.input` into `cfg.output` (or finish an earlier run with `cfg.resume`); returns the manifest.
    One run at a time per local output (sentiment_ray/run_lock.py)."""
    with RunLock.for_output(cfg.output):
        return _score(cfg)


def _score(cfg: ScoreConfig) -> dict:
    # Every check before open_score_output, which with --overwrite deletes the earlier output.
    inputs = check_inputs(cfg)
    refuse_overlap(cfg.output, [cfg.input, *inputs.paths], "score input")
    scoring_model = resolve_model(cfg)
    output = open_score_output(cfg.output, cfg.overwrite, cfg.resume)
    plan = make_plan(cfg, inputs, scoring_model.identity, scoring_model.model)
    if output.state is OutputState.FINISHED:
        return _already_finished(output, plan)
    plan = _start_or_resume(output, plan)
    fragments = output.fragments()
    pending = [(i, u) for i, u in enumerate(plan.units)
               if tile(u, fragments) is None and not output.skipped_path(u).exists()]
    # Fragments of an unfinished unit are rewritten whole by this run: drop the stale ones first.
    output.delete_fragments([f for f in fragments if any(
        f.file_index == u.file_index and u.start <= f.start < u.stop for _, u in pending)])
    logger.info("%d rows in %d file(s), %d work units (%d already committed) -> %s", inputs.rows_in,
                len(inputs.files), len(plan.units), len(plan.units) - len(pending), output.folder)
    started = time.perf_counter()
    written: dict[str, dict] = {}
    if pending:
        written = _run_pipeline(cfg, inputs, plan, pending, scoring_model, output)
    seconds = time.perf_counter() - started
    committed = check_committed(output, plan.units, written)
    rows_scored_now = sum(u.rows for _, u in pending) - sum(
        u.rows for _, u in pending if output.skipped_path(u).exists())
    manifest = _manifest(cfg, inputs, plan, committed, len(pending), rows_scored_now, seconds)
    output.manifest_file.write_bytes((json.dumps(manifest, indent=2, default=str) + "\n").encode())
    skipped = (f"; SKIPPED {committed.rows_skipped} rows in {len(committed.units_skipped)} unit(s) and "
               f"{len(inputs.unreadable)} unreadable file(s)") if committed.rows_skipped or inputs.unreadable else ""
    logger.info("%d rows into %s (%d scored, %d marked%s); statuses %s; this run: %d units in %.1f s (%s rows/s, "
                "start-up included)", committed.rows_out, output.folder, manifest["rows_scored"],
                manifest["rows_marked"], skipped, dict(committed.status_counts), len(pending), seconds,
                manifest["rows_per_second"])
    return {**manifest, "output": output.folder.uri}


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


def _already_finished(output: ScoreOutput, plan: ScorePlan) -> dict:
    """`--resume` on a finished output: nothing to score, if it was scored from these inputs and settings."""
    manifest = json.loads(output.manifest_file.read_text())
    recorded = manifest.get("plan_settings")
    if recorded is None:
        raise OutputExistsError(f"output {output.folder} is complete, but its manifest predates the record of its "
                                "inputs, so --resume cannot check that it matches them; pass --overwrite to score again")
    changed = [key for key, value in plan.settings.items() if recorded.get(key) != value]
    if changed:
        raise OutputExistsError(f"output {output.folder} is complete, but it was scored from other "
                                f"{', '.join(changed)} than this run's; pass --overwrite to score again, or choose "
                                "a new output")
    logger.info("%s is already complete (%d rows); nothing to resume", output.folder, manifest["rows_out"])
    return {**manifest, "output": output.folder.uri}


def _run_pipeline(cfg: ScoreConfig, inputs: ScoreInputs, plan: ScorePlan, pending, scoring_model: ScoringModel,
                  output: ScoreOutput) -> dict[str, dict]:
    import ray

    from sentiment_ray.ray_cluster import ensure_ray

    ensure_ray(cfg.ray)
    run_id = uuid.uuid4().hex
    ledger = attempt_ledger(run_id)  # noqa: F841 - held by the driver: it lives as long as this run
    spec = ReadSpec(inputs.id_column, cfg.text_column, tuple(cfg.keep_columns), inputs.derived_ids,
                    cfg.skip_unreadable_files, inputs.schema, output.folder.uri)
    model_args = {"adapter": scoring_model.adapter, "weights_sha256": scoring_model.weights_sha256,
                  "model": scoring_model.model, "prompt": scoring_model.prompt}
    faults = FaultPlan.from_env(default_marker=_fault_marker(output))
    pool = min(cfg.pool_size, len(pending))
    dataset = ray.data.read_datasource(unit_datasource(pending, spec, cfg.batch_size * 4),
                                       override_num_blocks=len(pending), num_cpus=cfg.io_cpus)
    prepare_actors, prepare_cpus = _prepare_pool(cfg, pool)
    dataset = dataset.map_batches(
        PrepareStage, fn_constructor_kwargs={**model_args, "fail_text": faults.fail_text},
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=prepare_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=prepare_actors))
    dataset = dataset.map_batches(
        ScoreStage, fn_constructor_kwargs={
            **model_args, "max_batch_tokens": cfg.max_batch_tokens,
            "torch_threads": cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor)), "run_id": run_id,
            "files": inputs.paths, "unit_files": [u.file_index for u in plan.units], "faults": faults.to_dict()},
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor, resources=cfg.actor_resources or None,
        compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=cfg.batches_in_flight))
    sink = fragment_datasink(output.folder.uri, inputs.schema, dict(pending), plan.rows_per_unit)
    try:
        dataset.write_datasink(sink, ray_remote_args={"num_cpus": cfg.io_cpus})
    except Exception as exc:
        user_error = _input_error_inside(exc)
        if user_error is not None:
            raise user_error from None
        raise
    return {w["fragment"]: w for w in sink.written}


def _prepare_pool(cfg: ScoreConfig, scoring_actors: int) -> tuple[int, float]:
    """(largest size, CPUs per actor) of the CPU tokenizing pool: as set, else as many actors as the cluster's CPUs
    left after the scoring actors and the read/write tasks allow. On a small node that leaves less than a CPU,
    the one actor gets what is left: asking for more would starve the read tasks, and the job would hang."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    left = cpus - scoring_actors * cfg.num_cpus_per_actor - 2 * cfg.io_cpus
    each = cfg.num_cpus_per_prepare_actor
    if cfg.prepare_actors:
        return cfg.prepare_actors, each
    if left < each:
        return 1, max(min(each, left), 0.1)
    return max(1, int(left // max(each, 0.01))), each


def _fault_marker(output: ScoreOutput) -> str:
    import hashlib
    import tempfile

    digest = hashlib.sha256(output.folder.uri.encode()).hexdigest()[:12]
    return f"{tempfile.gettempdir()}/sentiment-ray-fault-{digest}"


def _input_error_inside(exc: BaseException) -> InputError | None:
    """The InputError a task or actor raised, out of the layers Ray and Ray Data wrap around it (the chain of
    causes does not always survive the trip back to the driver; the traceback text does)."""
    import re

    found = re.search(r"sentiment_ray\.data\.InputError: (.+)", str(exc))
    if found:
        return InputError(found.group(1).strip().splitlines()[0])
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InputError):
            return InputError(str(current).splitlines()[0])
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def _manifest(cfg: ScoreConfig, inputs: ScoreInputs, plan: ScorePlan, committed: CommittedOutput, units_run: int,
              rows_scored_now: int, seconds: float) -> dict:
    statuses = dict(committed.status_counts)
    return {
        "rows_in": inputs.rows_in,
        "rows_out": committed.rows_out,
        "rows_scored": statuses.get(OK_STATUS, 0),
        "rows_marked": committed.rows_out - statuses.get(OK_STATUS, 0),
        "rows_skipped": committed.rows_skipped,
        "rows_truncated": committed.truncated,
        "status_counts": statuses,
        "files_skipped": inputs.unreadable,
        "units_skipped": committed.units_skipped,
        "units": {"total": len(plan.units), "committed_before_this_run": len(plan.units) - units_run,
                  "scored_this_run": units_run, "rows_per_unit": plan.rows_per_unit,
                  "fragments": committed.fragments},
        "ids": (f"derived: '<file key>:<row index>' in column {inputs.id_column!r}" if inputs.derived_ids
                else f"input column {inputs.id_column!r}"),
        "adapter": committed.adapter,
        "input_files": inputs.paths,
        "seconds": round(seconds, 2),
        # This run's work only: rows scored now over this run's wall time (start-up included).
        "rows_per_second": round(rows_scored_now / seconds, 2) if seconds and rows_scored_now else None,
        "config": to_dict(cfg),
        "plan_settings": plan.settings,  # what a later --resume on this finished output checks its inputs against
    }
