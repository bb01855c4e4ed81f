"""Typed configs for the two jobs, loaded from YAML with `section.key=value` overrides (torchtune style).

Every error names the file and the dotted key, so a typo in a 100-line YAML is a one-line fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sentiment_ray.model.names import EMBEDDED_MODEL
from sentiment_ray.model.prompt import PromptError, PromptSpec

BACKENDS = ("auto", "hf", "unsloth")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FORWARD_MODES = ("eager", "static_shapes", "cuda_graphs", "compiled", "compiled_graphs", "packed",
                 "compiled_packed")  # ScoreConfig.forward
# forwards padded to ShapeBuckets, replayed from CUDA graphs, run through compiled layers, packed without padding
SHAPED_FORWARDS = ("static_shapes", "cuda_graphs", "compiled_graphs")
GRAPHED_FORWARDS = ("cuda_graphs", "compiled_graphs")
COMPILED_FORWARDS = ("compiled", "compiled_graphs", "compiled_packed")
PACKED_FORWARDS = ("packed", "compiled_packed")
BUDGETED_FORWARDS = SHAPED_FORWARDS + PACKED_FORWARDS  # their forwards are cut from max_batch_tokens
NO_QUANTIZATION = "none"
QUANTIZATIONS = (NO_QUANTIZATION, "fp8")  # ScoringModelConfig.quantization (sentiment_ray/model/fp8.py)


class ForwardUnavailable(ValueError):
    """A forward mode that cannot run where the model is (no CUDA device, an unsupported architecture): the scorer
    says so in one log line and scores with the eager forward instead (SentimentScorer.__init__)."""
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config value that is missing, unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    # A local folder, a hub id, or `embedded:smollm2-135m-instruct` (built from PyPI, no hub needed).
    name_or_path: str = EMBEDDED_MODEL
    backend: str = "auto"  # auto picks unsloth when CUDA is present and unsloth imports, else hf
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    device: str = "auto"  # auto: cuda when present (hf backend; unsloth is always cuda)

    def __post_init__(self):
        _choice("model.backend", self.backend, BACKENDS)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.device", self.device, DEVICES)


@dataclass
class FinetuneModelConfig(ModelConfig):
    # The base model's Hugging Face Hub id, recorded in the adapter's metadata, model card and adapter_config.json
    # (name_or_path is often a local path that means nothing elsewhere). None: derived from name_or_path where
    # one is known (sentiment_ray/model/hub_id.py); set it when the base is a local copy of a hub model.
    base_model_id: str | None = None

    def __post_init__(self):
        super().__post_init__()
        from sentiment_ray.model.hub_id import is_hub_id

        if self.base_model_id is not None and not is_hub_id(self.base_model_id):
            raise ConfigError(f"model.base_model_id must be a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct "
                              f"(org/name), got {self.base_model_id!r}")


@dataclass
class ScoringModelConfig(ModelConfig):
    # "": the base model recorded in the adapter (zero-shot: the embedded SmolLM2); set it to override
    # the recorded path, e.g. where the base lives at another path on the scoring nodes.
    name_or_path: str = ""
    # Fold the LoRA weights into the base once at load (peft merge_and_unload): no adapter matmuls per
    # forward. Needs an unquantized base (load_in_4bit: false).
    merge_adapter: bool = False
    # `fp8`: the decoder's linear layers as dynamic row-wise float8 (e4m3) matmuls (torch._scaled_mm), the adapter
    # merged into them first; the LM head, embeddings and norms stay bfloat16 (sentiment_ray/model/fp8.py). Needs a
    # CUDA GPU of compute capability >= 8.9 (Ada, Hopper); elsewhere the scoring actor says so in one warning line
    # and scores in model.dtype without it. The manifest records what was applied. Off by default, and off in the
    # shipped configs, until benchmarks/gpu_fp8.py has measured it against bf16 (docs/CONFIGURATION.md).
    quantization: str = NO_QUANTIZATION

    def __post_init__(self):
        super().__post_init__()
        if self.merge_adapter and self.load_in_4bit:
            raise ConfigError("model.merge_adapter needs an unquantized base: set model.load_in_4bit to false")
        _choice("model.quantization", self.quantization, QUANTIZATIONS)
        if self.quantization != NO_QUANTIZATION:
            check_quantization(self)


def check_quantization(model: ScoringModelConfig) -> None:
    """model.quantization=fp8 against the other model keys: each contradiction is one line before any work."""
    fix = "or set model.quantization=none"
    if model.load_in_4bit:
        raise ConfigError(f"model.quantization={model.quantization} quantizes a bfloat16 base itself; it cannot "
                          f"requantize a 4-bit (bitsandbytes) base: set model.load_in_4bit to false, {fix}")
    if model.backend == "unsloth":
        raise ConfigError(f"model.quantization={model.quantization} replaces transformers' linear layers, which "
                          f"Unsloth's patched layers read directly: set model.backend to hf, {fix}")
    if model.dtype in ("float32", "float16"):
        raise ConfigError(f"model.quantization={model.quantization} computes in bfloat16 (row-wise float8 matmuls "
                          f"give bfloat16 results), which model.dtype={model.dtype} contradicts: set model.dtype to "
                          f"bfloat16 or auto, {fix}")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))

    def __post_init__(self):
        _positive("lora.r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")


@dataclass
class DataConfig:
    # Local Parquet (file, folder or glob), or `hf:<dataset name>` for a Hugging Face dataset.
    train: str = ""
    hf_split: str = "train"
    text_column: str = "text"
    label_column: str = "label"
    limit: int | None = None  # take the first N rows after shuffling (seeded)
    shuffle_seed: int = 0
    # Share of the training rows replaced by an excerpt of themselves (8-60 consecutive words, same label,
    # chosen by shuffle_seed): teaches the adapter short texts too (training/excerpts.py). 0: whole reviews.
    excerpt_share: float = 0.0
    # Rows held out of training (the first N after shuffling, whole reviews) to fit the temperature that makes
    # `score` a calibrated probability (calibration.py); stored with the adapter, applied by score and predict.
    # 0: no calibration (temperature 1).
    calibration_rows: int = 0

    def __post_init__(self):
        if self.limit is not None:
            _positive("data.limit", self.limit)
        if self.calibration_rows < 0:
            raise ConfigError(f"data.calibration_rows must be >= 0, got {self.calibration_rows}")
        if not 0.0 <= self.excerpt_share <= 1.0:
            raise ConfigError(f"data.excerpt_share must be in [0, 1], got {self.excerpt_share}")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    logging_steps: int = 10
    seed: int = 42
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    torch_threads: int | None = None  # CPU only; default: the CPUs the worker reserves
    # Batches of reviews of similar length (transformers' LengthGroupedSampler): far less padding per batch, the
    # same reviews per epoch; the order within an epoch is still seeded random across length groups. With several
    # workers each groups its own rows (train_data.WorkerBatchSampler).
    group_by_length: bool = False
    # Padding-free batches (reviews packed into one row, attention kept within each by Unsloth's varlen flash
    # kernel; backends/unsloth_varlen.py gives torch 2.11 the same kernel): no compute or memory spent on pad
    # tokens. Unsloth backend only: transformers' sdpa attention lets a packed review see the ones before it.
    # The configs choose it per model by measurement (docs/BENCHMARKS.md §15); set explicitly either way, because
    # Unsloth turns it on by itself otherwise.
    padding_free: bool = False
    dataloader_workers: int = 0  # processes collating batches beside the training loop (0: in the loop)
    # A resumable trainer checkpoint (adapter, optimizer, scheduler, RNG, step) every N optimizer steps,
    # reported to Ray Train so that a restarted worker or a rerun continues from it; 0: none.
    checkpoint_steps: int = 100

    def __post_init__(self):
        _positive("train.batch_size", self.batch_size)
        if self.checkpoint_steps < 0:
            raise ConfigError(f"train.checkpoint_steps must be >= 0 (0: no checkpoints), got {self.checkpoint_steps}")
        _positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("train.learning_rate", self.learning_rate)
        _positive("train.logging_steps", self.logging_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set train.epochs > 0 or train.max_steps > 0")


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS / a running local cluster / start one; "local": a private one
    num_cpus: int | None = None  # only when this process starts Ray itself (default: cores + 1)
    use_gpu: bool = False
    # Finetuning: Ray Train workers training one adapter data-parallel (DDP; gloo on CPU, nccl on GPU), each
    # with `cpus_per_worker` CPUs and, with use_gpu, `gpus_per_worker` GPUs. The global batch is
    # train.batch_size x num_workers x train.gradient_accumulation_steps: to keep a one-worker recipe, divide
    # train.batch_size by num_workers; to grow the global batch instead, scale the learning rate with it
    # (linear for small factors, sqrt(factor) as configs/finetune/smollm2_gpu.yaml did from 32 to 64).
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # only with use_gpu (Unsloth and DDP want one whole GPU per worker)
    # Custom Ray resources each training worker asks for besides its CPUs and GPU, e.g. {trainer: 1} to keep the
    # workers on nodes started with `--resources '{"trainer": 1}'` (one worker per such node).
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    storage_path: str | None = None  # Ray Train checkpoints; must be shared storage on a multi-node cluster
    # A rerun with the same run_name and storage_path resumes that run from its latest checkpoint.
    run_name: str | None = None
    max_failures: int = 2  # training worker failures Ray Train recovers from (from the last checkpoint); -1: any
    checkpoints_to_keep: int = 2  # in storage_path; the finished adapter is always the latest
    # After losing a node, how long a job waits for a node to join (an autoscaler's, a replacement) where the nodes
    # left cannot hold it: a scoring stage none of them can hold, or finetune's ray.num_workers workers. Then it
    # stops with one line, resumable (docs/RESILIENCE.md).
    wait_for_resources_s: float = 600.0

    def __post_init__(self):
        _positive("ray.cpus_per_worker", self.cpus_per_worker)
        _positive("ray.num_workers", self.num_workers)
        _positive("ray.gpus_per_worker", self.gpus_per_worker)
        _positive("ray.checkpoints_to_keep", self.checkpoints_to_keep)
        _resource_amounts("ray.resources_per_worker", self.resources_per_worker)
        if self.wait_for_resources_s < 0:
            raise ConfigError(f"ray.wait_for_resources_s must be >= 0, got {self.wait_for_resources_s}")
        if self.max_failures < -1:
            raise ConfigError(f"ray.max_failures must be >= -1 (-1: no limit), got {self.max_failures}")


@dataclass
class FinetuneConfig:
    output_dir: str = ""
    overwrite: bool = False
    # For a job that may run again with the same arguments (a retried RayJob): an adapter already in output_dir
    # that this config and data trained is reported as it is; otherwise the run goes on from ray.run_name's
    # latest checkpoint (which is why it needs ray.run_name). An adapter trained otherwise is refused.
    resume_if_exists: bool = False
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> FinetuneConfig:
        _required("output_dir", self.output_dir)
        _required("data.train", self.data.train)
        if self.resume_if_exists and self.overwrite:
            raise ConfigError("pass either resume_if_exists (keep an adapter this run trained) or overwrite (train "
                              "again and replace it), not both")
        check_padding_free(self.train.padding_free, self.model.backend)
        if self.resume_if_exists and not self.ray.run_name:
            raise ConfigError("resume_if_exists needs ray.run_name: without it a rerun gets a new Ray Train run "
                              "and trains from step 0 instead of resuming the earlier run's checkpoints")
        return self


def check_padding_free(padding_free: bool, backend: str) -> None:
    """Padding-free batches need attention that stays within each packed review: Unsloth's, not sdpa's."""
    if padding_free and backend == "hf":
        raise ConfigError("train.padding_free needs model.backend unsloth: with the hf backend (sdpa attention) "
                          "each review packed into a row would attend to the reviews packed before it; set "
                          "train.padding_free=false for hf")


@dataclass
class ScoreConfig:
    input: str = ""  # Parquet file, folder or glob; a local path or a URI (s3://, gs://, file://)
    output: str = ""  # a folder (local path or URI) that must not exist yet (or pass resume/overwrite)
    adapter: str | None = None  # a folder or URI written by finetune; None: zero-shot with model.name_or_path
    overwrite: bool = False  # replace an existing output (and drop an unfinished run's work)
    resume: bool = False  # continue an unfinished run into `output`, skipping its committed work units
    # For a job that may run again with the same arguments (a retried RayJob): resume an earlier run's output
    # (finished: checked and left as it is), or start one where there is none. Changed settings are refused.
    resume_if_exists: bool = False
    # Rows per work unit: the grain of resume and of the output's files (about one file per unit;
    # docs/RESILIENCE.md). Small inputs are cut finer so that every scoring actor gets work.
    unit_rows: int = 10_000
    skip_unreadable_files: bool = False  # report and skip unreadable Parquet instead of failing the job
    # None: the input's "id" column when the files have one, else ids derived as `<file key>:<row index>` into a
    # column named "id". A name set here must be a column of every input file (a typo is an error, not derived ids).
    id_column: str | None = None
    text_column: str = "text"
    keep_columns: list[str] = field(default_factory=list)  # input columns copied to the output (text included)
    # label/label_id are positive when score >= threshold. None: the threshold stored with the adapter
    # (`threshold` in sentiment_ray.json), else 0.5. `evaluate` reports the best one on a labeled set.
    threshold: float | None = None
    # Rows per batch that a tokenizing (prepare) actor and then a scoring actor are handed (Ray Data's map_batches
    # batch_size: a batch can be smaller where the rows of the blocks sent to an actor run out). It also sizes
    # the read tasks' blocks (4 x batch_size rows), and the rows per work unit are rounded up to a multiple of it.
    batch_size: int = 32
    # How the scoring actor cuts a batch into forward passes. None: one forward per batch, padded to its longest
    # row. A number: the batch's rows sorted by length and grouped so that rows x longest row <= this many padded
    # tokens per forward (less padding; bounded activation memory).
    max_batch_tokens: int | None = None
    # How the scoring actor runs its forwards: `eager` (length-sorted groups within max_batch_tokens),
    # `static_shapes` (the groups padded to a few fixed shapes, forward_shapes.py), `cuda_graphs` (static shapes,
    # each replayed from a CUDA graph captured on first use: no per-kernel launch cost; GPU only; scores
    # bit-identical to eager), `compiled` (the eager groups with each decoder layer under torch.compile: fused
    # elementwise kernels, one graph for all layers and shapes, compiled by each actor once; compiled_forward.py),
    # `compiled_graphs` (the compiled layers on static shapes, each shape captured as a CUDA graph: fused kernels and
    # no launches; GPU only), `packed` (no padding: the rows of a forward end to end in one row of <= max_batch_tokens
    # tokens, each attending to itself through the varlen flash kernel; packed_forward.py; hf backend, Llama-family
    # models) and `compiled_packed` (packed, through the compiled layers). The compiled modes need an unquantized
    # base (hf backend). On one H200 the 7B job's steady scoring rate was 97 reviews/s eager and 170 compiled_packed;
    # SmolLM2's 4,569 compiled_graphs and 3,607 compiled_packed, paced by the tokenizing stage (BENCHMARKS §16). Their
    # bf16 scores are not eager's (up to 0.06 apart on a finetuned SmolLM2) but as close to a float32 forward as
    # eager's are (§14, §16), which is why eager stays the default, also in the GPU configs.
    forward: str = "eager"
    pool_size: int = 1  # scoring actors; one per GPU on a GPU cluster
    num_cpus_per_actor: float = 1.0  # per scoring actor
    num_gpus_per_actor: float = 0.0
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per scoring actor
    batches_in_flight: int = 2  # batches queued at each scoring actor, so the next one is there when it is free
    torch_threads: int | None = None  # default: the CPUs each actor reserves
    # The CPU stage that tokenizes (an autoscaling actor pool): None: as many actors as the cluster's CPUs left
    # after the scoring actors and the read/write tasks. 0: Ray tasks instead of actors, each asking for
    # num_cpus_per_prepare_actor; every worker process loads the tokenizer once and keeps it (small or CPU-only
    # jobs: no actor to start, no CPU held between batches).
    prepare_actors: int | None = None
    num_cpus_per_prepare_actor: float = 1.0  # per tokenizing actor (or task)
    io_cpus: float = 0.25  # per read task: light, so reads are never starved on a small node (writes reserve 0)
    model: ScoringModelConfig = field(default_factory=ScoringModelConfig)
    prompt: PromptSpec = field(default_factory=PromptSpec)  # used only for zero-shot; an adapter brings its own
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> ScoreConfig:
        _required("input", self.input)
        _required("output", self.output)
        _positive("batch_size", self.batch_size)
        _positive("pool_size", self.pool_size)
        _positive("unit_rows", self.unit_rows)
        _positive("batches_in_flight", self.batches_in_flight)
        if self.prepare_actors is not None and self.prepare_actors < 0:
            raise ConfigError(f"prepare_actors must be >= 0 (0: tokenize in Ray tasks), got {self.prepare_actors}")
        if self.io_cpus < 0 or self.num_cpus_per_prepare_actor < 0:
            raise ConfigError("io_cpus and num_cpus_per_prepare_actor must be >= 0")
        _resource_amounts("actor_resources", self.actor_resources)
        if (self.resume or self.resume_if_exists) and self.overwrite:
            raise ConfigError("pass either resume or resume_if_exists (continue an earlier run) or overwrite (start "
                              "over), not both")
        if self.max_batch_tokens is not None:
            _positive("max_batch_tokens", self.max_batch_tokens)
        _choice("forward", self.forward, FORWARD_MODES)
        if self.forward in BUDGETED_FORWARDS and not self.max_batch_tokens:
            raise ConfigError(f"forward={self.forward} needs max_batch_tokens: its forwards are cut from it")
        if self.forward in COMPILED_FORWARDS and (self.model.load_in_4bit or self.model.backend == "unsloth"):
            raise ConfigError(f"forward={self.forward} needs an unquantized base on the hf backend (model.backend: hf, "
                              "model.load_in_4bit: false): Unsloth's and bitsandbytes' kernels do not compile")
        if self.forward in PACKED_FORWARDS and self.model.backend == "unsloth":
            raise ConfigError(f"forward={self.forward} needs the hf backend (model.backend: hf): it hands each "
                              "review's offsets to transformers' attention, which Unsloth's patched layers drop")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1] (a score >= it is positive), got {self.threshold}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ConfigError("num_cpus_per_actor and num_gpus_per_actor must be >= 0")
        return self


# ---------------------------------------------------------------------------------------------- loading


def _choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _resource_amounts(key: str, resources: object) -> None:
    """A mapping of Ray resource name to amount >= 0 (actor_resources, ray.resources_per_worker)."""
    if not isinstance(resources, dict):
        raise ConfigError(f"{key} must be a mapping of resource name to amount, got {resources!r}")
    for name, amount in resources.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            raise ConfigError(f"{key}.{name} must be a number >= 0, got {amount!r}")


def _positive(key, value):
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def _required(key, value):
    if not value:
        raise ConfigError(f"{key} is required (set it in the YAML or as {key}=... on the command line)")


def _coerce(value, hint, key: str):
    """Check/convert a YAML value against a dataclass field type; nested dataclasses recurse."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return build_config(hint, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (object,)
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def build_config(cls, data: dict, prefix: str = ""):
    """A config dataclass from a plain mapping (YAML, or `asdict` output sent to a Ray worker), type-checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!r}; known keys here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except PromptError as exc:
        raise ConfigError(str(exc)) from None


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file plus `a.b=value` overrides; errors name the file and the key."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    data = merge_overrides(data, overrides or [])
    try:
        config = build_config(cls, data)
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
