"""Model backends behind one interface: `hf` (transformers + peft, CPU or GPU) and `unsloth` (GPU only).

    common.py           which backend, device and dtype a config means; the base model's path; the tokenizer
    hf.py               transformers + peft
    unsloth_backend.py  Unsloth (imported only when chosen)
    unsloth_varlen.py   Unsloth's attention over packed, variable-length rows

Both return a peft-wrapped causal LM and its tokenizer; adapters saved by either load with
`PeftModel.from_pretrained(base, adapter_dir)`. Unsloth is imported only when chosen, because it raises without
an NVIDIA GPU and must be imported before transformers to patch it.
"""

from __future__ import annotations

from sentiment_ray.config import LoraSettings, ModelConfig
from sentiment_ray.model.backends.common import (
    cuda_available,
    load_tokenizer,
    resolve_backend,
    resolve_model_path,
    torch_device,
    torch_dtype,
)

# The shared helpers are part of the package's interface: callers write `backends.resolve_model_path(...)`.
__all__ = ["cuda_available", "load_for_scoring", "load_for_training", "load_tokenizer", "resolve_backend",
           "resolve_model_path", "torch_device", "torch_dtype"]


def _module(backend: str):
    if backend == "hf":
        from sentiment_ray.model.backends import hf

        return hf
    if backend == "unsloth":
        from sentiment_ray.model.backends import unsloth_backend

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


