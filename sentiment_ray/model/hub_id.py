"""The base model's Hugging Face Hub id, where one is known.

Training and scoring load the base from a local path (the embedded model's cache folder, a folder on shared
storage), which means nothing on another machine. The hub id is what a model card and `adapter_config.json`
name instead, so that an adapter folder can be shared or pushed as it is; the local path stays beside it in
the adapter's metadata for loading.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sentiment_ray.model.names import EMBEDDED_MODEL, TINY_MODEL

# `org/name` as the Hub spells repository ids (letters, digits, `-`, `_`, `.`; no leading `.` or `-`).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# A name with no organisation (`gpt2`): a hub id only where transformers was given it as one.
_LEGACY_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Where huggingface_hub caches a repository: <cache>/models--<org>--<name>/snapshots/<revision>.
_HUB_CACHE_FOLDER = re.compile(r"models--([A-Za-z0-9][A-Za-z0-9_.-]*)--([A-Za-z0-9][A-Za-z0-9_.-]*)")


def is_hub_id(name: str) -> bool:
    """`org/name` with the Hub's characters, and no `..` (which no repository id holds)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def known_hub_id(name_or_path: str) -> str | None:
    """The hub id of the base model a config names (`model.name_or_path`), or None where none is known:

    - `embedded:smollm2-135m-instruct`: the model its GGUF was made from, HuggingFaceTB/SmolLM2-135M-Instruct;
    - `embedded:tiny-random-mistral`: None (random weights built here, on no hub);
    - a local folder: what the folder says about itself (folder_hub_id);
    - anything else is what transformers took for a hub id: that name.
    """
    from sentiment_ray.model import embedded as embedded_model

    if name_or_path == EMBEDDED_MODEL:
        return embedded_model.HUB_ID
    if name_or_path == TINY_MODEL:
        return None
    local = Path(name_or_path).expanduser()
    if local.exists():
        return folder_hub_id(local.resolve())
    if is_hub_id(name_or_path) or (_LEGACY_HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path):
        return name_or_path
    return None


def folder_hub_id(folder: Path) -> str | None:
    """The hub id a local model folder records, by the hints that mean it: the embedded model's build record, a
    huggingface_hub cache path (`models--org--name/snapshots/...`), or an `org/name` in config.json's
    `_name_or_path` (older transformers saved the id the model was loaded by). None otherwise: a GGUF's
    `_model_name_or_path` ("Smollm2 135M 8k ...") or a local path is no hub id."""
    from sentiment_ray.model import embedded as embedded_model

    source = folder / embedded_model.SOURCE_FILE
    if source.is_file():
        try:
            record = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
        if record.get("source") == embedded_model.WHEEL_REQUIREMENT:
            return embedded_model.HUB_ID
    for part in reversed(folder.parts):
        if match := _HUB_CACHE_FOLDER.fullmatch(part):
            return f"{match[1]}/{match[2]}"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    hint = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(hint, str) and is_hub_id(hint) and not Path(hint).expanduser().exists():
        return hint
    return None
