"""Model backends behind one interface: `hf` (transformers + peft, CPU or GPU) and `unsloth` (GPU only).

Both return a peft-wrapped causal LM and its tokenizer; adapters saved by either load with
`PeftModel.from_pretrained(base, adapter_dir)`. Unsloth is imported only when chosen, because it raises without
an NVIDIA GPU and must be imported before transformers to patch it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sentiment_ray.config import EMBEDDED_MODEL, TINY_MODEL, LoraSettings, ModelConfig


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
        from sentiment_ray.embedded_model import prepare_embedded_model

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


def _module(backend: str):
    if backend == "hf":
        from sentiment_ray.backends import hf

        return hf
    if backend == "unsloth":
        from sentiment_ray.backends import unsloth_backend

        return unsloth_backend
    raise ValueError(f"unknown backend {backend!r}")


def load_for_training(model: ModelConfig, lora: LoraSettings, *, max_length: int, gradient_checkpointing: bool,
                      seed: int):
    """(peft model ready to train, tokenizer, backend name)."""
    backend = resolve_backend(model.backend)
    peft_model, tokenizer = _module(backend).load_for_training(
        model, lora, max_length=max_length, gradient_checkpointing=gradient_checkpointing, seed=seed
    )
    return peft_model, tokenizer, backend


def load_for_scoring(model: ModelConfig, base_path: str, adapter_dir: str | None, *, max_length: int):
    """(model in eval mode on its device, tokenizer, backend name); `adapter_dir=None` scores the base zero-shot."""
    backend = resolve_backend(model.backend)
    loaded, tokenizer = _module(backend).load_for_scoring(model, base_path, adapter_dir, max_length=max_length)
    return loaded, tokenizer, backend


def _cached_tiny_model() -> Path:
    from sentiment_ray.embedded_model import cache_dir
    from sentiment_ray.outputs import staging_dir
    from sentiment_ray.tiny_model import build_tiny_model

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
