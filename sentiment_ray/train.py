"""The finetune job: a Ray Train `TorchTrainer` whose worker runs TRL's `SFTTrainer` with a LoRA adapter.

The driver loads and checks the data, resolves the model, and starts one worker with the resources from the
config; the worker tokenizes with the shared `PromptEncoder`, trains on the completion (the label token) only,
and reports the adapter folder as a Ray Train checkpoint, which the driver copies to `output_dir`. Along the
way it reports resumable trainer checkpoints, so a killed worker or a rerun continues from the latest one
(sentiment_ray/train_checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

from sentiment_ray.config import FinetuneConfig, FinetuneModelConfig, build_config
from sentiment_ray.data import InputError, fingerprint, load_labeled_hf, load_labeled_parquet
from sentiment_ray.excerpts import replace_with_excerpts
from sentiment_ray.labels import CLASS_NAMES
from sentiment_ray.outputs import check_output_location_free, commit, refuse_overlap, staging_dir, upload_output

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeldOutRows:
    """Labeled rows kept out of training, to fit the adapter's temperature on (DataConfig.calibration_rows)."""

    texts: list[str]
    labels: list[int]


def load_training_rows(cfg: FinetuneConfig) -> tuple[list[str], list[int], dict]:
    """The training rows, shuffled and limited, checked (InputError naming the file and row) on the driver, so
    that bad data ends the command before Ray starts rather than inside the training worker."""
    texts, labels, info, _ = load_rows(cfg)
    return texts, labels, info


def load_rows(cfg: FinetuneConfig) -> tuple[list[str], list[int], dict, HeldOutRows]:
    """`load_training_rows`, and the held-out calibration rows taken before the limit and the excerpts."""
    data = cfg.data
    if data.train.startswith("hf:"):
        texts, labels = load_labeled_hf(data.train[3:], data.hf_split, data.text_column, data.label_column)
        files = []
    else:
        texts, labels, files = load_labeled_parquet(data.train, data.text_column, data.label_column)
    order = list(range(len(texts)))
    random.Random(data.shuffle_seed).shuffle(order)
    if data.calibration_rows and data.calibration_rows >= len(order):
        raise InputError(f"{data.train}: data.calibration_rows={data.calibration_rows} holds out all {len(order)} "
                         "rows; nothing would be left to train on")
    held_out = HeldOutRows([texts[i] for i in order[:data.calibration_rows]],
                           [labels[i] for i in order[:data.calibration_rows]])
    order = order[data.calibration_rows:]
    if data.limit:
        order = order[: data.limit]
    texts = [texts[i] for i in order]
    labels = [labels[i] for i in order]
    texts, excerpts = replace_with_excerpts(texts, data.excerpt_share, data.shuffle_seed)
    if not texts:
        held = f" (its {len(files)} Parquet file(s) hold 0 rows)" if files else ""
        raise InputError(f"{data.train}: no training rows{held}; finetuning needs at least one labeled review")
    if len(set(labels)) == 1:
        logger.warning("%s: all %d training rows are %s; the adapter will learn that one class only",
                       data.train, len(labels), CLASS_NAMES[labels[0]])
    info = {
        "source": data.train,
        "files": files,
        "rows": len(texts),
        "positives": sum(labels),
        "fingerprint": fingerprint(texts, labels),
        "text_column": data.text_column,
        "label_column": data.label_column,
        "shuffle_seed": data.shuffle_seed,
        "limit": data.limit,
        "excerpt_share": data.excerpt_share,
        "excerpts": excerpts,
        "calibration_rows": len(held_out.texts),
        "calibration_fingerprint": fingerprint(held_out.texts, held_out.labels) if held_out.texts else None,
    }
    return texts, labels, info, held_out


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
    """Step, loss and tokens/s as Ray metrics (sentiment_ray/metrics.py), at each Trainer log."""
    from transformers import TrainerCallback

    from sentiment_ray.metrics import FinetuneRecorder

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
    from sentiment_ray import backends

    backend_name = backends.resolve_backend(cfg.model.backend)
    if backend_name == "unsloth":
        from sentiment_ray.backends.unsloth_backend import _fast_language_model

        _fast_language_model()
    return backend_name


def build_trainer(cfg: FinetuneConfig, texts: list[str], labels: list[int], work_dir: str,
                  extra_callbacks: tuple = ()) -> TrainingSetup:
    """Model + adapter, tokenized prompt/label examples and a TRL `SFTTrainer` over them."""
    backend_name = import_backend_first(cfg)
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sentiment_ray import backends, trl_cpu_fallback
    from sentiment_ray.prompt import PromptEncoder

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
        max_length=cfg.prompt.max_length,  # prompts are clipped to fit already; TRL's cut never triggers
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
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_throughput_callback(timings), *extra_callbacks],
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
    from sentiment_ray.calibration import fit_temperature
    from sentiment_ray.scorer import SentimentScorer

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
    from sentiment_ray.metadata import name_base_in_adapter_config
    from sentiment_ray.model_card import write_adapter_card

    peft_model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if metadata.base_model_id:
        name_base_in_adapter_config(folder, metadata.base_model_id)
    metadata.write(folder)
    write_adapter_card(folder, metadata)


def train_worker(loop_config: dict) -> None:
    """Ray Train worker entry point: build model and data, run SFTTrainer (resuming when Ray Train holds a
    checkpoint of this run), report the adapter."""
    from sentiment_ray.logging_setup import configure_worker_logging

    configure_worker_logging(loop_config.get("log_level"))
    cfg: FinetuneConfig = build_config(FinetuneConfig, loop_config["config"])
    import_backend_first(cfg)  # before ray.train pulls in transformers
    import ray.train

    from sentiment_ray import train_checkpoints
    from sentiment_ray.faults import FaultPlan
    from sentiment_ray.metadata import METADATA_FILE, AdapterMetadata, read_metadata

    work_dir = tempfile.mkdtemp(prefix="sentiment-ray-train-")
    restored = train_checkpoints.restore_latest(work_dir)
    if restored is not None and (restored / METADATA_FILE).exists():
        # The run had finished and reported its adapter before the failure: hand that back, train nothing.
        logger.info("the run's latest checkpoint is the finished adapter; reporting it again")
        metrics = read_metadata(restored).metrics
        ray.train.report({**metrics, "step": metrics["steps"]},
                         checkpoint=ray.train.Checkpoint.from_directory(restored), checkpoint_dir_name="adapter")
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    if restored is not None:
        logger.info("resuming from the checkpoint of step %d", train_checkpoints.checkpoint_step(restored))
    callbacks = [_ray_train_metrics_callback(), _ray_metrics_callback(loop_config["run_name"]),
                 train_checkpoints.report_checkpoints_callback()]
    faults = FaultPlan(**loop_config.get("faults", {}))
    if faults.train_exit_at_step is not None:
        callbacks.append(train_checkpoints.fault_callback(faults))
    setup = build_trainer(cfg, loop_config["texts"], loop_config["labels"], str(Path(work_dir) / "trainer"),
                          extra_callbacks=tuple(callbacks))
    trainer, tokenizer, encoder, backend = setup.trainer, setup.tokenizer, setup.encoder, setup.backend
    logger.info("training on %d examples: backend %s on %s, model loaded in %.1f s", len(setup.prompts), backend,
                "GPU" if setup.on_gpu else "CPU", setup.load_seconds)
    metrics = run_training(setup, resume_from=restored)
    logger.info("trained %d steps in %.1f s (loss %s, %s tokens/s)", metrics["steps"], metrics["train_seconds"],
                metrics["train_loss"], metrics["tokens_per_second"])
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
    from sentiment_ray import backends
    from sentiment_ray.hub_id import known_hub_id

    return dataclasses.replace(model, name_or_path=backends.resolve_model_path(model.name_or_path),
                               base_model_id=model.base_model_id or known_hub_id(model.name_or_path))


def run_finetune(cfg: FinetuneConfig, command: str | None = None) -> dict:
    """Train an adapter on a Ray cluster (started locally when none is running); returns its metadata dict.
    `command` (the command line, where there is one) is recorded in the adapter's metadata and model card."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sentiment_ray import faults
    from sentiment_ray.logging_setup import level_for_workers
    from sentiment_ray.metadata import METADATA_FILE, read_metadata
    from sentiment_ray.ray_cluster import ensure_ray
    from sentiment_ray.storage import location
    from sentiment_ray.train_checkpoints import check_finished_adapter, claim_run, run_identity

    # Every check on the output and the data before Ray starts: an hour of training must not end in a refusal.
    if not cfg.data.train.startswith("hf:"):
        refuse_overlap(cfg.output_dir, [cfg.data.train], "training data")
    finished = cfg.resume_if_exists and location(cfg.output_dir).join(METADATA_FILE).is_file()
    final = location(cfg.output_dir) if finished else check_output_location_free(cfg.output_dir, cfg.overwrite,
                                                                                 METADATA_FILE)
    texts, labels, data_info, held_out = load_rows(cfg)
    logger.info("%d training rows from %s (fingerprint %s)", len(texts), cfg.data.train, data_info["fingerprint"])
    cfg = dataclasses.replace(cfg, model=resolve_base_model(cfg.model))
    if finished:  # a rerun of a job that had finished: the same adapter, or a refusal naming what differs
        metadata = check_finished_adapter(final, run_identity(cfg, data_info["fingerprint"]))
        logger.info("%s already holds the adapter this run trains (%s steps); nothing to train", final,
                    metadata.metrics.get("steps"))
        return {**metadata.to_dict(), "adapter_dir": final.uri, "wall_seconds": 0.0}

    ensure_ray(cfg.ray)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    storage = cfg.ray.storage_path
    if storage and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    run_config = RunConfig(
        name=cfg.ray.run_name or f"sentiment-ray-finetune-{int(time.time())}",
        storage_path=storage,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
    )
    if claim_run(run_config.storage_path, run_config.name, run_identity(cfg, data_info["fingerprint"])):
        logger.info("run %s exists in %s: resuming from its latest checkpoint", run_config.name,
                    run_config.storage_path)
    fault_plan = faults.FaultPlan.from_env(str(Path(tempfile.gettempdir()) / f"sentiment-ray-fault-{run_config.name}"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": dataclasses.asdict(cfg),
            "texts": texts,
            "labels": labels,
            "calibration_texts": held_out.texts,
            "calibration_labels": held_out.labels,
            "data_info": data_info,
            "command": command,
            "faults": fault_plan.to_dict(),
            "run_name": run_config.name,  # the tag of the worker's metrics
            "log_level": level_for_workers(),
        },
        scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("the training worker finished without reporting an adapter checkpoint")

    if final.is_local:
        staging = staging_dir(Path(final.path))
        result.checkpoint.to_directory(str(staging))
        commit(staging, Path(final.path), cfg.overwrite, METADATA_FILE)
    else:  # an object store: the adapter is fetched into a local folder, then uploaded file by file
        staging = Path(tempfile.mkdtemp(prefix="sentiment-ray-adapter-"))
        result.checkpoint.to_directory(str(staging))
        upload_output(staging, final, cfg.overwrite, METADATA_FILE)
        shutil.rmtree(staging, ignore_errors=True)
    metadata = read_metadata(final)
    wall = time.perf_counter() - started
    logger.info("adapter written to %s: %d steps, loss %s, %.1f s wall (Ray Train included)", final,
                metadata.metrics["steps"], metadata.metrics["train_loss"], wall)
    return {**metadata.to_dict(), "adapter_dir": final.uri, "wall_seconds": round(wall, 2)}
