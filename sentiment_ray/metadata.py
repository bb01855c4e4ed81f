"""The metadata file saved beside every adapter: what scoring needs to reproduce training's input exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sentiment_ray import __version__
from sentiment_ray.labels import CLASS_NAMES
from sentiment_ray.prompt import PromptSpec

METADATA_FILE = "sentiment_ray.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """A folder that is not a usable sentiment_ray adapter."""


@dataclass
class AdapterMetadata:
    base_model: str
    backend: str
    prompt: PromptSpec
    label_token_ids: list[int]
    label_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    lora: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    package_version: str = __version__
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

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


def read_metadata(folder: str | Path) -> AdapterMetadata:
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        raise AdapterError(f"{folder} is not a sentiment_ray adapter: it has no {METADATA_FILE}")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {data.get('format_version')!r}, this package reads {FORMAT_VERSION}")
    try:
        return AdapterMetadata.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise AdapterError(f"{path}: {exc}") from None


def adapter_identity(folder: str | Path) -> str:
    """`<folder name>@<sha256 of the adapter weights, 12 hex>`: names the exact weights that scored a row."""
    folder = Path(folder)
    digest = hashlib.sha256()
    with open(folder / ADAPTER_WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"{folder.name}@{digest.hexdigest()[:12]}"
