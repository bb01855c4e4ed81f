"""The metadata file saved beside every adapter: what scoring needs to reproduce training's input exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sentiment_ray import __version__
from sentiment_ray.io.storage import Location, local_copy_of_folder, location
from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.labels import CLASS_NAMES
from sentiment_ray.model.prompt import PromptSpec

METADATA_FILE = "sentiment_ray.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
# What an adapter folder of a release that did not list its files (`files_written`) may hold: the files finetune
# writes (peft's weights and config, a tokenizer's files, the model card, this metadata). Anything else there is
# not this tool's, and `--overwrite` refuses the folder.
LEGACY_ADAPTER_FILES = frozenset({
    METADATA_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
})


@dataclass
class AdapterMetadata:
    base_model: str  # what scoring loads the base from: a local path (or a hub id) on the machine that trained
    backend: str
    prompt: PromptSpec
    label_token_ids: list[int]
    label_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    lora: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    threshold: float | None = None  # score's label threshold for this adapter (None: 0.5); --threshold overrides
    # Logits are divided by it before the softmax that gives `score` (None: 1, uncalibrated); fitted by finetune
    # on held-out training rows (calibration.py), applied by score, predict and export alike.
    temperature: float | None = None
    # The base model's Hugging Face Hub id where one is known (None: a local or random model, or an adapter written
    # before this field): what the model card and adapter_config.json name. Loading still uses base_model.
    base_model_id: str | None = None
    command: str | None = None  # the command line that trained the adapter, for its model card (None: unknown)
    package_version: str = __version__
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # Every file of the adapter folder (relative paths), recorded when finetune commits it: all that a later
    # --overwrite may delete (sentiment_ray/io/ownership.py). None: an adapter of an earlier release.
    files_written: list[str] | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["prompt"] = self.prompt.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterMetadata:
        data = dict(data)
        data["prompt"] = PromptSpec.from_dict(data["prompt"])
        return cls(**data)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def name_base_in_adapter_config(folder: str | Path, base_model_id: str) -> None:
    """Make adapter_config.json name the base model by its hub id. peft writes the path the base was loaded
    from, a local cache folder that means nothing elsewhere, so the folder could not be shared or pushed as it
    is. This package never loads the base from this field (scoring uses AdapterMetadata.base_model), so
    adapters with either value load the same way."""
    path = Path(folder) / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model_id
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_metadata(folder: str | Path | Location) -> AdapterMetadata:
    """The metadata of the adapter in `folder`, a local path or a URI (read through the store)."""
    folder = location(folder)
    path = folder.join(METADATA_FILE)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        raise AdapterError(f"{folder} is not a sentiment_ray adapter: it has no {METADATA_FILE}")
    if not folder.join(ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {data.get('format_version')!r}, "
                           f"this package reads {FORMAT_VERSION}")
    try:
        return AdapterMetadata.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise AdapterError(f"{path}: {exc}") from None


def adapter_weights_sha256(folder: str | Path | Location) -> str:
    """The sha256 (64 hex) of the adapter's weights, read through the store where the adapter lies."""
    weights = location(folder).join(ADAPTER_WEIGHTS)
    digest = hashlib.sha256()
    try:
        with weights.open_input_stream() as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise AdapterError(f"{weights.parent} has no {ADAPTER_WEIGHTS} (only safetensors adapters are "
                           "loaded)") from None
    return digest.hexdigest()


def adapter_identity(folder: str | Path | Location, weights_sha256: str | None = None) -> str:
    """`<folder name>@<sha256 of the adapter weights, 12 hex>`: names the exact weights that scored a row
    (hashed here unless the caller already knows the hash)."""
    folder = location(folder)
    return f"{folder.name}@{(weights_sha256 or adapter_weights_sha256(folder))[:12]}"


def local_adapter(adapter: str | Path | Location, weights_sha256: str | None = None) -> Path:
    """A local folder holding the adapter: the folder itself when it is local; for a URI, a copy in the cache
    (`<cache>/adapters/<sha256 of the weights>/`), downloaded once per node. Pass `weights_sha256` when it is
    known (hashed once on the driver), so that a copy already cached costs no read of the store at all."""
    from sentiment_ray.model.embedded import cache_dir

    folder = location(adapter)
    if folder.is_local:
        return Path(folder.path)
    key = weights_sha256 or adapter_weights_sha256(folder)

    def same_weights(copy: Path) -> None:
        if _file_sha256(copy / ADAPTER_WEIGHTS) != key:
            raise AdapterError(f"{folder.join(ADAPTER_WEIGHTS)} changed while it was being copied (or does not match "
                               f"the sha256 {key} it was named by); copy the adapter again")

    return local_copy_of_folder(folder, cache_dir() / "adapters", key, check=same_weights)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- checks before work starts


def check_base_model(name_or_path: str, trust_remote_code: bool = False, recorded_in: str | None = None) -> str:
    """The base model's local path (or hub id), checked on the driver so that a missing model is one line here
    rather than a traceback in every actor. A local folder must hold config.json and safetensors weights; a name
    that is no local path must resolve through transformers (its cache, or the hub when online)."""
    from sentiment_ray.model import backends

    resolved = backends.resolve_model_path(name_or_path)
    where = f"base model {name_or_path}" + (f" recorded in {recorded_in}" if recorded_in else "")
    local = Path(resolved)
    if local.exists():
        if not local.is_dir():
            problem = "it is a file, not a model folder"
        elif not (local / "config.json").is_file():
            problem = f"{local} has no config.json"
        elif not any(local.glob("*.safetensors")):
            problem = f"{local} has no *.safetensors weights (only safetensors weights are loaded)"
        else:
            return resolved
    elif local.is_absolute() or name_or_path.startswith((".", "~")):
        problem = "no such folder"
    else:
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
            return resolved
        except Exception as exc:  # noqa: BLE001 - hub, network, cache and config errors all mean "not usable"
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    fix = "pass --base-model to name it" if recorded_in else "check --base-model (model.name_or_path)"
    raise AdapterError(f"{where} cannot be found: {problem}; {fix}")


def check_adapter_loadable(adapter_dir: str | Path | Location, base_override: str = "",
                           trust_remote_code: bool = False) -> AdapterMetadata:
    """Everything loading this adapter needs, checked before any work starts: its metadata, its weights'
    safetensors header (a truncated or corrupt file is named here, not found inside every actor) and its base
    model (`base_override` or the one recorded at training), and that the weights' shapes are those its
    adapter_config.json makes on that base (sentiment_ray/model/base_modules.py). An adapter at a URI is checked on its
    local copy (local_adapter), which the work then uses."""
    from safetensors import SafetensorError, safe_open

    folder = location(adapter_dir)
    metadata = read_metadata(folder)
    if not folder.join(ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG} (peft needs it to load the adapter)")
    weights = folder.join(ADAPTER_WEIGHTS)
    local = local_adapter(folder)
    try:
        with safe_open(str(local / ADAPTER_WEIGHTS), framework="numpy") as tensors:
            # From the header alone: no tensor is read.
            names = tensors.keys()  # a safe_open handle is not iterable
            shapes = {name: tuple(tensors.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights}: not readable safetensors ({exc}); the file is truncated or damaged, copy "
                           "or train the adapter again") from None
    if not shapes:
        raise AdapterError(f"{weights}: holds no tensors")
    if base_override:
        base = check_base_model(base_override, trust_remote_code)
    else:
        base = check_base_model(metadata.base_model, trust_remote_code, recorded_in=str(folder.join(METADATA_FILE)))
    from sentiment_ray.model.base_modules import check_adapter_weights

    # Shapes against adapter_config.json and the base: else peft's `size mismatch` traceback in every actor.
    check_adapter_weights(str(weights), shapes, local, str(folder.join(ADAPTER_CONFIG)), base, trust_remote_code)
    return metadata
