"""The finetune job: a Ray Train `TorchTrainer` whose worker runs TRL's `SFTTrainer` with a LoRA adapter.

The driver checks the data in one streaming pass and fixes its order without holding the rows
(sentiment_ray/training/data.py), resolves the model, and starts `ray.num_workers` workers (DDP) with the resources
from the config; each worker reads its share of the rows from its Ray Dataset, tokenizes with the shared
`PromptEncoder`, trains on the completion (the label token) only, and worker 0 reports the adapter folder as a Ray
Train checkpoint, which the driver copies to `output_dir`. Along the way it reports resumable trainer checkpoints,
so a killed worker or a rerun continues from the latest one (sentiment_ray/training/checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from sentiment_ray.config import FinetuneConfig, FinetuneModelConfig, build_config, check_padding_free
from sentiment_ray.io.errors import one_line
from sentiment_ray.io.outputs import check_output_location_free, commit, refuse_overlap, staging_dir, upload_output
from sentiment_ray.io.ownership import record_files
from sentiment_ray.io.storage import Location, OutputWriteError, write_refused
from sentiment_ray.ops.ray_cluster import ResourceRequest
from sentiment_ray.training.data import HeldOutRows, TrainingData, load_rows

logger = logging.getLogger(__name__)


def load_training_rows(cfg: FinetuneConfig) -> tuple[list[str], list[int], dict]:
    """The training rows in training order (after the held-out rows, the limit and the excerpts), checked on the
    driver: for tools that want the rows themselves (benchmarks, tests). `run_finetune` does not load them
    (sentiment_ray/training/data.py)."""
    texts, labels, info, _ = load_rows(cfg)
    return texts, labels, info


# ------------------------------------------------------------------------------------------------ worker


WARMUP_STEPS_EXCLUDED = 2  # the first steps compile kernels (Unsloth, torch) and warm allocators


def _ray_train_metrics_callback():
    from transformers import TrainerCallback

    class RayTrainMetricsCallback(TrainerCallback):
        """Forwards the Trainer's logged losses to Ray Train (metrics only; the adapter is reported at the end)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            import ray.train

            if logs:
                metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                ray.train.report({**metrics, "step": state.global_step})

    return RayTrainMetricsCallback()


def _ray_metrics_callback(run: str):
    """Step, loss and tokens/s as Ray metrics (sentiment_ray/ops/metrics.py), at each Trainer log."""
    from transformers import TrainerCallback

    from sentiment_ray.ops.metrics import FinetuneRecorder

    recorder = FinetuneRecorder(run)

    class RayMetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.start(state.num_input_tokens_seen)  # a resumed run: the tokens its checkpoint had seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            recorder.record_log(state.global_step, loss if isinstance(loss, (int, float)) else None,
                                state.num_input_tokens_seen)

    return RayMetricsCallback()


def _throughput_callback(timings: dict):
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        """Time to the first step, and non-padding tokens/s once the warm-up steps are over."""

        # Counted from the step this attempt starts at: a resumed run restores step and tokens seen.
        def on_train_begin(self, args, state, control, **kwargs):
            timings.update(begin=time.perf_counter(), start_step=state.global_step,
                           start_tokens=state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == timings["start_step"] + 1:
                timings["first_step_seconds"] = round(now - timings["begin"], 3)
            if state.global_step == timings["start_step"] + WARMUP_STEPS_EXCLUDED:
                timings["warm"] = (now, state.num_input_tokens_seen)

        def on_train_end(self, args, state, control, **kwargs):
            if "warm" in timings and state.global_step > timings["start_step"] + WARMUP_STEPS_EXCLUDED:
                start, tokens = timings.pop("warm")
                elapsed = time.perf_counter() - start
                timings["steady_tokens_per_second"] = round((state.num_input_tokens_seen - tokens) / elapsed, 1)

    return ThroughputCallback()


def _log_last_step_callback():
    from transformers import TrainerCallback

    class LogLastStepCallback(TrainerCallback):
        """A log at the last step as well. The Trainer averages the loss over the workers only when it logs; the
        steps after the last log reach `training_loss` as worker 0's own loss, so on N workers the reported loss
        would depend on where the run ended between two logs."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStepCallback()


@dataclasses.dataclass
class TrainingSetup:
    """Everything the worker needs around `trainer.train()`: built once, also by benchmarks in-process."""

    trainer: object
    tokenizer: object
    encoder: object
    prompts: list
    backend: str
    on_gpu: bool
    load_seconds: float
    timings: dict


def import_backend_first(cfg: FinetuneConfig) -> str:
    """Resolve the backend on this process's hardware; Unsloth must be imported before transformers/trl."""
    from sentiment_ray.model import backends

    backend_name = backends.resolve_backend(cfg.model.backend)
    if backend_name == "unsloth":
        from sentiment_ray.model.backends.unsloth_backend import _fast_language_model

        _fast_language_model()
    return backend_name


def build_trainer(cfg: FinetuneConfig, texts: list[str], labels: list[int], work_dir: str,
                  extra_callbacks: tuple = (), worker_order: bool | None = None) -> TrainingSetup:
    """Model + adapter, tokenized prompt/label examples and a TRL `SFTTrainer` over them.

    `worker_order`: feed the rows in their given order (first epoch) and a seeded per-epoch permutation after
    (train_data.WorkerBatchSampler) instead of the Trainer's sampler, which under DDP would also shard rows that
    are one worker's share already. Default: on, except for train.group_by_length on one worker, where the
    Trainer's own LengthGroupedSampler does the same job."""
    backend_name = import_backend_first(cfg)
    check_padding_free(cfg.train.padding_free, backend_name)  # again: model.backend auto may have become hf
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sentiment_ray.model import backends
    from sentiment_ray.model.prompt import PromptEncoder
    from sentiment_ray.training import trl_cpu_fallback

    on_gpu = torch.cuda.is_available() and cfg.ray.use_gpu
    if not on_gpu:
        torch.set_num_threads(cfg.train.torch_threads or cfg.ray.cpus_per_worker)
    trl_cpu_fallback.install()

    load_started = time.perf_counter()
    model, tokenizer, backend = backends.load_for_training(
        dataclasses.replace(cfg.model, backend=backend_name),
        cfg.lora,
        max_length=cfg.prompt.max_length,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        seed=cfg.train.seed,
    )
    load_seconds = time.perf_counter() - load_started
    encoder = PromptEncoder(cfg.prompt, tokenizer)
    prompts = encoder.encode_prompts(encoder.clean_texts(texts))
    examples = [encoder.encode_example(p.input_ids, y) for p, y in zip(prompts, labels)]
    dataset = Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in examples],
        "completion_mask": [e["completion_mask"] for e in examples],
    })
    bf16 = on_gpu and backends.torch_dtype(cfg.model.dtype) == torch.bfloat16
    args = SFTConfig(
        output_dir=work_dir,
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.learning_rate,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        weight_decay=cfg.train.weight_decay,
        optim=cfg.train.optim,
        logging_steps=cfg.train.logging_steps,
        seed=cfg.train.seed,
        # Prompts are clipped to fit already, so TRL's cut never triggers; padding-free TRL refuses a max_length
        # without packing (it could not enforce it) and wants already clipped rows, which these are.
        max_length=None if cfg.train.padding_free else cfg.prompt.max_length,
        completion_only_loss=True,
        # Always explicit: Unsloth turns padding-free batching on by itself otherwise (TrainConfig.padding_free).
        padding_free=cfg.train.padding_free,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        gradient_checkpointing=cfg.train.gradient_checkpointing and backend == "hf",
        bf16=bf16,
        use_cpu=not on_gpu,
        save_strategy="steps" if cfg.train.checkpoint_steps else "no",
        save_steps=cfg.train.checkpoint_steps or 500,  # unused without a save strategy
        save_total_limit=1,  # on the worker's disk; Ray Train keeps its own copies in storage
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=cfg.train.dataloader_workers,
        dataloader_persistent_workers=cfg.train.dataloader_workers > 0,
    )
    timings: dict = {}
    if worker_order is None:
        worker_order = not cfg.train.group_by_length or cfg.ray.num_workers > 1
    trainer_cls = SFTTrainer
    if worker_order:
        from sentiment_ray.training.data import worker_order_trainer

        trainer_cls = worker_order_trainer(SFTTrainer)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_throughput_callback(timings), _log_last_step_callback(), *extra_callbacks],
    )
    return TrainingSetup(trainer, tokenizer, encoder, prompts, backend, on_gpu, load_seconds, timings)


def run_training(setup: TrainingSetup, resume_from: Path | None = None) -> dict:
    """`trainer.train()` and the figures the job reports: loss, steps, tokens/s, first step, peak memory.

    With `resume_from` (a trainer checkpoint folder) the Trainer restores adapter, optimizer, scheduler, RNG and
    step, and skips the batches already trained on; the time and token figures then cover this attempt only.
    """
    import torch

    trainer, prompts, timings = setup.trainer, setup.prompts, setup.timings
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen
    tokens_this_attempt = tokens - timings["start_tokens"]
    steps, start_step = trainer.state.global_step, timings["start_step"]  # restored before on_train_begin
    # The Trainer divides the loss summed over this attempt by all steps; rescale to this attempt's mean.
    train_loss = round(float(output.training_loss) * steps / (steps - start_step), 6) if steps > start_step else None
    metrics = {
        "train_loss": train_loss,
        "steps": int(steps),
        "resumed_from_step": int(start_step),
        "train_seconds": round(seconds, 3),
        "non_padding_tokens": int(tokens),
        "tokens_per_second": round(tokens_this_attempt / seconds, 1) if seconds else None,
        "steady_tokens_per_second": timings.get("steady_tokens_per_second"),
        "first_step_seconds": timings.get("first_step_seconds"),
        "model_load_seconds": round(setup.load_seconds, 3),
        "truncated_fraction": round(sum(p.truncated for p in prompts) / max(1, len(prompts)), 4),
    }
    if setup.on_gpu:
        metrics["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return metrics


CALIBRATION_BATCH_TOKENS = 65536


def calibrate(setup: TrainingSetup, cfg: FinetuneConfig, held_out: HeldOutRows):
    """The temperature of the trained adapter, fitted on the held-out rows (None when there are none): the
    trained model in memory scores them with the scorer's own forward, before any temperature."""
    if not held_out.texts:
        return None
    from sentiment_ray.model.scorer import SentimentScorer
    from sentiment_ray.training.calibration import fit_temperature

    model = setup.trainer.model
    model.eval()
    scorer = SentimentScorer(model, setup.tokenizer, cfg.prompt, "calibration", list(setup.encoder.label_token_ids),
                             max_batch_tokens=CALIBRATION_BATCH_TOKENS, forward="eager")
    started = time.perf_counter()
    margins = scorer.logit_margins(held_out.texts)
    scored = [(m, y) for m, y in zip(margins, held_out.labels) if m is not None]
    fit = fit_temperature([m for m, _ in scored], [y for _, y in scored])
    logger.info("temperature %.4f fitted on %d held-out rows in %.1f s (NLL %.4f -> %.4f, ECE %.4f -> %.4f)",
                fit.temperature, fit.rows, time.perf_counter() - started, fit.nll_before, fit.nll_after,
                fit.ece_before, fit.ece_after)
    return fit


def save_adapter_folder(peft_model, tokenizer, metadata, folder: Path) -> None:
    """The adapter folder as `PeftModel.from_pretrained` and the Hugging Face Hub expect it: weights (safetensors),
    adapter_config.json naming the base by its hub id where one is known, the tokenizer, this package's metadata
    and a model card (replacing peft's template card)."""
    from sentiment_ray.export.model_card import write_adapter_card
    from sentiment_ray.model.metadata import METADATA_FILE, name_base_in_adapter_config

    peft_model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if metadata.base_model_id:
        name_base_in_adapter_config(folder, metadata.base_model_id)
    metadata.write(folder)
    write_adapter_card(folder, metadata)
    # The folder is complete: its metadata lists every file, all that a later --overwrite may delete.
    record_files(folder, METADATA_FILE, sort_keys=True)


def training_shape(cfg: FinetuneConfig, world: int) -> dict:
    """The batch figures recorded in the adapter's metrics: the learning rate was set for the global batch."""
    return {"num_workers": world, "per_device_batch_size": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
            "global_batch_size": cfg.train.batch_size * world * cfg.train.gradient_accumulation_steps}


def train_worker(loop_config: dict) -> None:
    """Ray Train worker entry point (one of `ray.num_workers`): read this worker's rows, build model and data, run
    SFTTrainer under DDP (resuming when Ray Train holds a checkpoint of this run); worker 0 reports the adapter.

    Every worker calls `ray.train.report` the same number of times (Ray Train V2 waits for all of them at each
    report); only worker 0 attaches a checkpoint, as only it writes one (the HF Trainer saves on process 0)."""
    from sentiment_ray.ops.logging_setup import configure_worker_logging

    configure_worker_logging(loop_config.get("log_level"))
    cfg: FinetuneConfig = build_config(FinetuneConfig, loop_config["config"])
    import_backend_first(cfg)  # before ray.train pulls in transformers
    import ray.train

    from sentiment_ray.model.metadata import METADATA_FILE, AdapterMetadata, read_metadata
    from sentiment_ray.ops.faults import FaultPlan
    from sentiment_ray.training import checkpoints as train_checkpoints
    from sentiment_ray.training.data import WorkerShare, read_worker_rows

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.ray.use_gpu:
        import torch

        if torch.cuda.is_available():  # "cuda" in the backends then means this worker's GPU
            import ray.train.torch

            torch.cuda.set_device(ray.train.torch.get_device())
    work_dir = tempfile.mkdtemp(prefix="sentiment-ray-train-")
    restored = train_checkpoints.restore_latest(work_dir)
    if restored is not None and (restored / METADATA_FILE).exists():
        # The run had finished and reported its adapter before the failure: hand that back, train nothing.
        logger.info("the run's latest checkpoint is the finished adapter; reporting it again")
        metrics = read_metadata(restored).metrics
        checkpoint = ray.train.Checkpoint.from_directory(restored) if rank == 0 else None
        ray.train.report({**metrics, "step": metrics["steps"]}, checkpoint=checkpoint,
                         checkpoint_dir_name="adapter" if checkpoint else None)
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    if restored is not None:
        logger.info("worker %d: resuming from the checkpoint of step %d", rank,
                    train_checkpoints.checkpoint_step(restored))
    callbacks = [_ray_train_metrics_callback(), train_checkpoints.report_checkpoints_callback(rank)]
    if rank == 0:  # one series per run: tokens seen are summed over the workers already (the Trainer gathers them)
        callbacks.append(_ray_metrics_callback(loop_config["run_name"]))
    faults = FaultPlan(**loop_config.get("faults", {}))
    exits = faults.train_exit_at_step is not None and rank == world - 1  # kill one worker: the last
    if exits or faults.slow_batch_seconds:
        callbacks.append(train_checkpoints.fault_callback(faults, exits))
    share = WorkerShare.of(loop_config["training_rows"], rank, world)
    texts, labels = read_worker_rows(share)
    logger.info("worker %d of %d: %d training rows from its dataset shard", rank, world, len(texts))
    setup = build_trainer(cfg, texts, labels, str(Path(work_dir) / "trainer"), extra_callbacks=tuple(callbacks))
    trainer, tokenizer, encoder, backend = setup.trainer, setup.tokenizer, setup.encoder, setup.backend
    logger.info("worker %d: training on %d examples: backend %s on %s, model loaded in %.1f s", rank,
                len(setup.prompts), backend, "GPU" if setup.on_gpu else "CPU", setup.load_seconds)
    metrics = {**run_training(setup, resume_from=restored), **training_shape(cfg, world)}
    logger.info("worker %d: trained %d steps in %.1f s (loss %s, %s tokens/s)", rank, metrics["steps"],
                metrics["train_seconds"], metrics["train_loss"], metrics["tokens_per_second"])
    if rank != 0:
        ray.train.report({**metrics, "step": metrics["steps"]})
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    calibration = calibrate(setup, cfg, HeldOutRows(loop_config.get("calibration_texts", []),
                                                    loop_config.get("calibration_labels", [])))

    adapter_dir = Path(work_dir) / "adapter"
    metadata = AdapterMetadata(
        base_model=cfg.model.name_or_path,
        base_model_id=cfg.model.base_model_id,
        backend=backend,
        prompt=cfg.prompt,
        label_token_ids=list(encoder.label_token_ids),
        lora=dataclasses.asdict(cfg.lora),
        data=loop_config["data_info"],
        training={**dataclasses.asdict(cfg.train), "model": dataclasses.asdict(cfg.model)},
        metrics={**metrics, **({"calibration": calibration.to_dict()} if calibration else {})},
        temperature=calibration.temperature if calibration else None,
        command=loop_config.get("command"),
    )
    save_adapter_folder(trainer.model, tokenizer, metadata, adapter_dir)
    ray.train.report({**metrics, "step": metrics["steps"]}, checkpoint=ray.train.Checkpoint.from_directory(adapter_dir),
                     checkpoint_dir_name="adapter")
    shutil.rmtree(work_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ driver


def resolve_base_model(model: FinetuneModelConfig) -> FinetuneModelConfig:
    """The model config the workers get: `name_or_path` a local absolute path where it is one (relative paths
    break in workers; the embedded model is built once, here) and `base_model_id` the hub id, found from the name
    as given, before it becomes a local path (`embedded:...` names its hub model; model.base_model_id wins)."""
    from sentiment_ray.model import backends
    from sentiment_ray.model.hub_id import known_hub_id

    return dataclasses.replace(model, name_or_path=backends.resolve_model_path(model.name_or_path),
                               base_model_id=model.base_model_id or known_hub_id(model.name_or_path))


DEFAULT_CHECKPOINTS_DIR = "ray-train"  # below the cache folder: Ray Train's storage when ray.storage_path is unset


def _interruptible_trainer_class(wait_for_resources_s: float, rerun: str):
    """TorchTrainer whose Ctrl-C raises KeyboardInterrupt in the driver (exit 130 with one line, cli.py) after
    asking the run to stop; Ray Train's own handler aborts the run and leaves the process to exit 1 silently. Its
    controller does not retry a user error, and waits at most `wait_for_resources_s` for nodes that hold the
    workers (worker_room.py; `rerun` ends that line)."""
    from ray.train.torch import TorchTrainer

    from sentiment_ray.training.worker_room import waiting_scaling_policy

    class InterruptibleTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            signal.signal(signal.SIGINT, interrupt_handler(controller))
            signal.signal(signal.SIGTERM, interrupt_handler(controller))  # KubeRay, `ray job stop`

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = user_errors_not_retried(self.run_config.failure_config)
            controller_init_kwargs["scaling_policy"] = waiting_scaling_policy(self.scaling_config,
                                                                              wait_for_resources_s, rerun)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return InterruptibleTorchTrainer


def _user_error_types() -> tuple[type, ...]:
    """What a worker raises for a mistake in the config, data, adapter or model it was given: the same again on
    every attempt, so it is never retried."""
    from sentiment_ray.config import ConfigError
    from sentiment_ray.io.errors import InputError
    from sentiment_ray.model.errors import AdapterError
    from sentiment_ray.model.labels import LabelError
    from sentiment_ray.model.prompt import PromptError

    kinds: tuple[type, ...] = (ConfigError, InputError, LabelError, AdapterError, PromptError)
    try:
        from peft.utils.error import NoMatchingPeftModuleError

        kinds += (NoMatchingPeftModuleError,)
    except ImportError:  # an older peft: its ValueError is retried like any other worker failure
        pass
    return kinds


def _worker_errors(error: BaseException) -> list[BaseException]:
    """What the training workers raised, out of Ray Train's WorkerGroupError and its UserExceptionWithTraceback
    wrappers, each with its chain of causes."""
    found = []
    for failure in getattr(error, "worker_failures", {}).values():
        raised = getattr(failure, "_base_exc", failure)
        while raised is not None:
            found.append(raised)
            raised = raised.__cause__
    return found


def _failure_summary(error: BaseException) -> str:
    """The first worker failure, in one line: the type and first line of what the worker raised."""
    first = next(iter(_worker_errors(error)), error)
    text = str(first).strip().splitlines()
    return f"{type(first).__name__}: {text[0][:200]}" if text else type(first).__name__


def user_error_inside(error: BaseException) -> BaseException | None:
    """The user error (see _user_error_types) a training worker raised; None for any other failure."""
    kinds = _user_error_types()
    return next((e for e in _worker_errors(error) if isinstance(e, kinds)), None)


def user_errors_not_retried(failure_config):
    """Ray Train's default failure policy, except that a worker failing with a user error ends the run at once
    (else Ray Train restarts the workers ray.max_failures times to meet the same error). A private hook of Ray
    Train (the controller's `failure_policy`), like `_register_sigint_handler` above: where it is gone, the
    driver's checks (run_finetune) still catch these errors before any worker starts."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    from sentiment_ray.training.worker_room import cluster_too_small_inside

    class UserErrorsNotRetried(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if user_error_inside(training_failed_error) is not None:
                logger.info("a training worker failed with a user error; not retrying it")
                return FailureDecision.RAISE
            if cluster_too_small_inside(training_failed_error) is not None:  # the wait for room is over
                return FailureDecision.RAISE
            decision = super().make_decision(training_failed_error)
            if decision == FailureDecision.RETRY:
                # A warning: this runs in Ray Train's controller actor, whose stderr reaches the driver's log.
                logger.warning("training worker failure (a worker process died or its node was lost: %s); Ray "
                               "Train restarts the workers (ray.max_failures=%s), which resume from the run's latest "
                               "checkpoint", _failure_summary(training_failed_error), failure_config.max_failures)
            return decision

    return UserErrorsNotRetried(failure_config)


def interrupt_handler(controller):
    """For SIGINT and SIGTERM alike: the run is asked to stop, and the driver ends as cli.py reports a signal."""
    from sentiment_ray.ops.signals import Terminated

    def on_signal(signum, frame):
        # A second signal stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            controller.abort.remote()  # the workers stop; the checkpoints already reported stay for a rerun
        except Exception:  # the controller is gone already: nothing to stop
            logger.debug("could not ask the training run to stop", exc_info=True)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    return on_signal


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
    """What the driver knows before Ray starts: the checked config (its base model resolved), where the adapter
    goes, the scanned training rows and the held-out ones, and the finished adapter of an earlier identical run."""

    cfg: FinetuneConfig
    final: Location
    training: TrainingData
    data_info: dict
    held_out: HeldOutRows
    finished: dict | None  # run_finetune's result when the adapter is already there (resume_if_exists)


def run_finetune(cfg: FinetuneConfig, command: str | None = None) -> dict:
    """Train an adapter on a Ray cluster (started locally when none is running); returns its metadata dict.
    `command` (the command line, where there is one) is recorded in the adapter's metadata and model card.

    check (output, data, base model: before Ray) -> connect -> train (Ray Train workers) -> commit the adapter"""
    from sentiment_ray.ops.ray_cluster import check_requests_fit, ensure_ray

    plan = check_before_training(cfg)
    if plan.finished is not None:
        return plan.finished
    ensure_ray(plan.cfg.ray)
    check_requests_fit(finetune_requests(plan.cfg))  # a worker no node can hold would wait with no end
    run_config = _run_config(plan)
    started = time.perf_counter()
    result = _fit(_trainer(plan, run_config, command), run_config)
    metadata = _commit_adapter(result, plan)
    if plan.cfg.ray.storage_path is None:  # the adapter is in place: the run's checkpoints in the cache are not needed
        shutil.rmtree(Path(run_config.storage_path) / run_config.name, ignore_errors=True)
    wall = time.perf_counter() - started
    logger.info("adapter written to %s: %d steps, loss %s, %.1f s wall (Ray Train included)", plan.final,
                metadata.metrics["steps"], metadata.metrics["train_loss"], wall)
    return {**metadata.to_dict(), "adapter_dir": plan.final.uri, "wall_seconds": round(wall, 2)}


def check_before_training(cfg: FinetuneConfig) -> FinetunePlan:
    """Every check on the output, the data and the model before Ray starts: an hour of training must not end in a
    refusal, and a user error found in the workers would be retried ray.max_failures times."""
    from sentiment_ray.io.storage import location
    from sentiment_ray.model.base_modules import check_target_modules
    from sentiment_ray.model.metadata import LEGACY_ADAPTER_FILES, METADATA_FILE, check_base_model
    from sentiment_ray.training.checkpoints import check_finished_adapter, run_identity
    from sentiment_ray.training.data import WorkerShare, scan_training_data

    if not cfg.data.train.startswith("hf:"):
        refuse_overlap(cfg.output_dir, [cfg.data.train], "training data")
    finished = cfg.resume_if_exists and location(cfg.output_dir).join(METADATA_FILE).is_file()
    final = location(cfg.output_dir) if finished else check_output_location_free(
        cfg.output_dir, cfg.overwrite, METADATA_FILE, legacy=LEGACY_ADAPTER_FILES)
    training = scan_training_data(cfg)
    data_info, held_out, world = training.info, training.held_out, cfg.ray.num_workers
    left_out = data_info["rows"] - world * WorkerShare.of(data_info["rows"], 0, world).rows
    if world > 1:  # rows per worker are equal so that DDP steps stay in lockstep (training/data.py)
        data_info = {**data_info, "num_workers": world, "rows_left_out_for_equal_shards": left_out}
    logger.info("%d training rows from %s (fingerprint %s)%s", data_info["rows"], cfg.data.train,
                data_info["fingerprint"],
                f", {world} workers, {left_out} row(s) left out for equal shares" if world > 1 else "")
    cfg = dataclasses.replace(cfg, model=resolve_base_model(cfg.model))
    done = None
    if finished:  # a rerun of a job that had finished: the same adapter, or a refusal naming what differs
        metadata = check_finished_adapter(final, run_identity(cfg, data_info["fingerprint"]))
        logger.info("%s already holds the adapter this run trains (%s steps); nothing to train", final,
                    metadata.metrics.get("steps"))
        done = {**metadata.to_dict(), "adapter_dir": final.uri, "wall_seconds": 0.0}
    else:
        check_base_model(cfg.model.name_or_path, cfg.model.trust_remote_code)
        check_target_modules(cfg.model.name_or_path, cfg.lora.target_modules, cfg.model.trust_remote_code)
    return FinetunePlan(cfg, final, training, data_info, held_out, done)


def _run_config(plan: FinetunePlan):
    """Ray Train's RunConfig: where checkpoints go, how many failures a run survives, and the run's name, under
    which a rerun resumes from the latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from sentiment_ray.training.checkpoints import claim_run, run_identity

    cfg = plan.cfg
    storage = cfg.ray.storage_path
    if storage is None:
        # Not Ray's default ~/ray_results, which keeps every run's checkpoints (~90 MB for SmolLM2) forever: a
        # cache folder, from which a crashed run resumes with the same ray.run_name and which a finished run empties.
        from sentiment_ray.model.embedded import cache_dir

        storage = str(cache_dir() / DEFAULT_CHECKPOINTS_DIR)
    elif "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    run_config = RunConfig(
        name=cfg.ray.run_name or f"sentiment-ray-finetune-{int(time.time())}",
        storage_path=storage,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
    )
    if claim_run(run_config.storage_path, run_config.name, run_identity(cfg, plan.data_info["fingerprint"])):
        logger.info("run %s exists in %s: resuming from its latest checkpoint", run_config.name,
                    run_config.storage_path)
    return run_config


def _trainer(plan: FinetunePlan, run_config, command: str | None):
    """The TorchTrainer: `ray.num_workers` workers running train_worker, each reading its own share of the rows."""
    from ray.train import DataConfig, ScalingConfig

    from sentiment_ray.ops import faults
    from sentiment_ray.ops.logging_setup import level_for_workers
    from sentiment_ray.training.data import worker_datasets

    cfg = plan.cfg
    resources = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    fault_plan = faults.FaultPlan.from_env(str(Path(tempfile.gettempdir()) / f"sentiment-ray-fault-{run_config.name}"))
    rerun = (f"rerun with ray.run_name={run_config.name} and ray.storage_path={run_config.storage_path} on a cluster "
             "that holds the workers, to continue from the run's last checkpoint")
    return _interruptible_trainer_class(cfg.ray.wait_for_resources_s, rerun)(
        train_worker,
        train_loop_config={
            "config": dataclasses.asdict(cfg),
            "training_rows": plan.data_info["rows"],
            "calibration_texts": plan.held_out.texts,
            "calibration_labels": plan.held_out.labels,
            "data_info": plan.data_info,
            "command": command,
            "faults": fault_plan.to_dict(),
            "run_name": run_config.name,  # the tag of the worker's metrics
            "log_level": level_for_workers(),
        },
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=run_config,
        # One dataset per worker, read whole by it (training/data.py: a fixed share per worker, not Ray's dynamic
        # split)
        datasets=worker_datasets(plan.training, cfg),
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def _fit(trainer, run_config):
    """trainer.fit(), with a worker's user error raised as itself (never retried, no Ray traceback around it) and a
    refused checkpoint write as an OutputWriteError."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as exc:
        from sentiment_ray.ops.ray_cluster import ClusterTooSmallError
        from sentiment_ray.training.worker_room import cluster_too_small_inside

        too_small = cluster_too_small_inside(exc)
        if too_small is not None:  # its line names the workers, the resource and the rerun
            logger.debug("the cluster left after losing a node", exc_info=True)
            raise ClusterTooSmallError(str(too_small)) from None
        user_error = user_error_inside(exc)
        if user_error is None:
            refused = next((e for e in _worker_errors(exc) if write_refused(e)), None)
            if refused is None:
                raise
            logger.debug("training failed in a worker", exc_info=True)
            raise OutputWriteError(f"a training worker could not write its checkpoint (kept in "
                                   f"{run_config.storage_path}): {one_line(refused)}") from None
        logger.debug("training failed in a worker", exc_info=True)  # the worker's traceback, for -v
        if type(user_error).__name__ == "NoMatchingPeftModuleError":  # peft's words, with the setting named
            from sentiment_ray.config import ConfigError

            raise ConfigError(f"lora.target_modules: {user_error}") from None
        raise user_error from None
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in previous.items():  # Ray Train leaves its own handler installed
                signal.signal(signum, handler)
    if result.checkpoint is None:
        raise RuntimeError("the training worker finished without reporting an adapter checkpoint")
    return result


def _commit_adapter(result, plan: FinetunePlan):
    """The adapter of the last checkpoint under its final name (a local commit or an upload); its metadata."""
    from sentiment_ray.model.metadata import LEGACY_ADAPTER_FILES, METADATA_FILE, read_metadata

    final, overwrite = plan.final, plan.cfg.overwrite
    staging = (staging_dir(Path(final.path)) if final.is_local
               else Path(tempfile.mkdtemp(prefix="sentiment-ray-adapter-")))
    try:
        result.checkpoint.to_directory(str(staging))
        if final.is_local:
            commit(staging, Path(final.path), overwrite, METADATA_FILE, legacy=LEGACY_ADAPTER_FILES)
        else:  # an object store: the adapter is fetched into a local folder, then uploaded file by file
            # A store refusing it raises OutputWriteError (exit 1), the staging folder kept and named
            upload_output(staging, final, overwrite, METADATA_FILE, legacy=LEGACY_ADAPTER_FILES)
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        if not write_refused(exc):
            raise
        # The half-copied staging folder goes (it holds the space a rerun needs); the final name was never
        # touched, and the run's checkpoints are still in storage for the rerun.
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputWriteError(f"could not write the adapter to {final}: {one_line(exc)}") from exc
    return read_metadata(final)


def finetune_requests(cfg: FinetuneConfig) -> list[ResourceRequest]:
    """What each training worker asks Ray for."""
    resources = {"CPU": float(cfg.ray.cpus_per_worker), **({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {}),
                 **cfg.ray.resources_per_worker}
    return [ResourceRequest("each training worker", resources,
                            {"CPU": "ray.cpus_per_worker", "GPU": "ray.gpus_per_worker",
                             **{name: f"ray.resources_per_worker.{name}" for name in cfg.ray.resources_per_worker}})]
