"""Resumable finetuning: trainer checkpoints go to Ray Train, and a restarted worker continues from the latest.

Every `train.checkpoint_steps` optimizer steps the HF Trainer writes `checkpoint-N` (adapter weights in
safetensors, optimizer, scheduler, RNG states, step and tokens seen); `ReportCheckpointsToRay` reports that
folder to Ray Train, which copies it to `ray.storage_path`. When the worker dies, Ray Train restarts it
(`ray.max_failures`) and `ray.train.get_checkpoint()` hands back the latest folder, from which
`trainer.train(resume_from_checkpoint=...)` restores everything and skips the batches already seen, so the run
ends with the planned number of steps. A rerun of the job with the same `ray.run_name` and `ray.storage_path`
(after the driver died) resumes the same way: Ray Train V2 reloads the run's checkpoint list from storage.

A checkpoint is only resumed by a run that would have produced it: same data fingerprint, model, LoRA,
prompt and training settings. The driver records that identity beside the run in storage and refuses a
mismatching rerun before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sentiment_ray.config import ConfigError, FinetuneConfig

if TYPE_CHECKING:
    from sentiment_ray.io.storage import Location
    from sentiment_ray.model.metadata import AdapterMetadata

RUN_IDENTITY_FILE = "sentiment_ray_run.json"
# Settings that change how the run reports or how fast it goes, never what it computes.
_NOT_IDENTITY = {"logging_steps", "torch_threads", "checkpoint_steps", "dataloader_workers"}


class ResumeMismatchError(ConfigError):
    pass


def run_identity(cfg: FinetuneConfig, data_fingerprint: str) -> dict:
    """What a checkpoint depends on: resuming it under any other value would train a different adapter."""
    # base_model_id only names the base (model card, adapter_config.json): it changes nothing trained
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in {"backend", "device", "base_model_id"}}
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_IDENTITY}
    identity = {"data_fingerprint": data_fingerprint, "model": model, "lora": dataclasses.asdict(cfg.lora),
                "prompt": dataclasses.asdict(cfg.prompt), "train": train}
    if cfg.ray.num_workers > 1:
        # The global batch, the rows each worker holds and the steps per epoch depend on it. Absent for one worker,
        # so that runs and adapters recorded before ray.num_workers existed keep their identity.
        identity["num_workers"] = cfg.ray.num_workers
    return json.loads(json.dumps(identity))  # as read back from storage: tuples become lists


def claim_run(storage_path: str, run_name: str, identity: dict) -> bool:
    """Record this run's identity in storage; True when the run already exists there (a rerun that resumes).

    Raises ResumeMismatchError, naming the file and the differing settings, when a run of that name was
    started with other data or settings.
    """
    from sentiment_ray.io.storage import location

    run = location(storage_path).join(run_name)
    identity_file = run.join(RUN_IDENTITY_FILE)
    if identity_file.is_file():
        recorded = json.loads(identity_file.read_text())
        if recorded != identity:
            differing = sorted(k for k in identity if recorded.get(k) != identity[k])
            raise ResumeMismatchError(
                f"Ray Train run {run_name!r} in {storage_path} was started with other {', '.join(differing)} "
                f"(recorded in {identity_file}); resuming it would mix two trainings. Choose another ray.run_name, "
                "or delete that run folder to start over.")
        return True
    run.makedirs()
    identity_file.write_bytes(json.dumps(identity, indent=2, sort_keys=True).encode())
    return False


def recorded_identity(metadata: AdapterMetadata) -> dict | None:
    """run_identity of the run that trained an adapter, from its metadata (AdapterMetadata); None when the
    metadata does not hold it all (an adapter from an older release)."""
    from sentiment_ray.config import FinetuneModelConfig, LoraSettings, TrainConfig, build_config

    training = dict(metadata.training)
    fingerprint = metadata.data.get("fingerprint")
    if "model" not in training or not fingerprint:
        return None
    try:
        recorded = FinetuneConfig(model=build_config(FinetuneModelConfig, training.pop("model")),
                                  lora=build_config(LoraSettings, metadata.lora), prompt=metadata.prompt,
                                  train=build_config(TrainConfig, training))
    except ConfigError:  # settings this release no longer has, or no longer accepts
        return None
    workers = metadata.metrics.get("num_workers", 1)  # adapters from before ray.num_workers: one worker
    recorded = dataclasses.replace(recorded, ray=dataclasses.replace(recorded.ray, num_workers=int(workers)))
    return run_identity(recorded, fingerprint)


def check_finished_adapter(final: Location, identity: dict) -> AdapterMetadata:
    """The metadata of the adapter already in `final`, when the run described by `identity`
    trained it: a rerun of a finished job reports it rather than training again. Anything else is refused
    (OutputExistsError naming what differs): an adapter is never replaced without --overwrite."""
    from sentiment_ray.io.outputs import OutputExistsError
    from sentiment_ray.model.metadata import read_metadata

    metadata = read_metadata(final)
    recorded = recorded_identity(metadata)
    if recorded is None:
        raise OutputExistsError(f"output {final} holds an adapter whose metadata does not record all its training "
                                "settings, so --resume-if-exists cannot check that this run trained it; pass "
                                "--overwrite to train again, or choose a new output_dir")
    differing = sorted(key for key in identity if recorded.get(key) != identity[key])
    if differing:
        raise OutputExistsError(f"output {final} holds an adapter trained with other {', '.join(differing)} than "
                                "this run's; pass --overwrite to train again, or choose a new output_dir")
    return metadata


def report_checkpoints_callback(rank: int = 0):
    """A TrainerCallback that reports each `checkpoint-N` the Trainer saves to Ray Train.

    With several workers only worker 0 has the folder (the Trainer saves on process 0; the other workers' RNG
    states stay on their disks, unused: the data order does not depend on them) and attaches it; the others report
    the step without a checkpoint, because Ray Train waits for every worker at each report."""
    from transformers import TrainerCallback

    class ReportCheckpointsToRay(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import ray.train

            metrics = {"step": state.global_step, "checkpoint_kind": "trainer"}
            if rank != 0:
                ray.train.report(metrics)
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=f"trainer-step-{state.global_step:08d}")

    return ReportCheckpointsToRay()


def fault_callback(plan, exits: bool):
    """A TrainerCallback running the training hooks of sentiment_ray/ops/faults.py: every step slowed by
    `SENTIMENT_RAY_FAULT_SLOW_BATCH_SECONDS`; with `exits` (one worker), `SENTIMENT_RAY_FAULT_TRAIN_EXIT_AT_STEP`."""
    from transformers import TrainerCallback

    class InjectTrainingFault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            plan.maybe_stall()
            if exits:
                plan.maybe_exit_training(state.global_step)

    return InjectTrainingFault()


def restore_latest(work_dir: str) -> Path | None:
    """The latest checkpoint Ray Train holds for this run, copied to a local folder; None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = Path(work_dir) / "restored-checkpoint"
    checkpoint.to_directory(str(local))
    return local


def checkpoint_step(folder: Path) -> int:
    return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
