"""What both backends share: which backend and device a config means, where its base model is, its tokenizer.

Below `hf` and `unsloth_backend`, which import it, and the package's `__init__`, which chooses between them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sentiment_ray.config import ModelConfig
from sentiment_ray.model.names import EMBEDDED_MODEL, TINY_MODEL


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    if name != "auto":
        return name
    return "unsloth" if cuda_available() and importlib.util.find_spec("unsloth") is not None else "hf"


def resolve_model_path(name_or_path: str) -> str:
    """Local folders become absolute (Ray workers run elsewhere); the embedded model is built on first use."""
    if name_or_path == EMBEDDED_MODEL:
        from sentiment_ray.model.embedded import prepare_embedded_model

        return str(prepare_embedded_model())
    if name_or_path == TINY_MODEL:
        return str(_cached_tiny_model())
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local.resolve())
    return name_or_path  # a hub id


def torch_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_dtype(name: str, device: str = "auto"):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch_device(device) == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(model: ModelConfig, path: str):
    """The tokenizer every backend scores and trains with (the base model's), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cached_tiny_model() -> Path:
    from sentiment_ray.io.outputs import staging_dir
    from sentiment_ray.model.embedded import cache_dir
    from sentiment_ray.model.tiny import build_tiny_model

    final = cache_dir() / "models" / "tiny-random-mistral"
    if not (final / "config.json").exists():
        staging = staging_dir(final)
        build_tiny_model(staging)
        try:
            staging.rename(final)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return final
