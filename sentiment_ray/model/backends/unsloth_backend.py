"""Unsloth's FastLanguageModel (4-bit QLoRA, fused kernels): GPU only, imported only when chosen."""

from __future__ import annotations

from sentiment_ray.config import LoraSettings, ModelConfig


def _fast_language_model():
    try:
        import unsloth  # noqa: F401  (must come before transformers/peft/trl are used, to patch them)
        from unsloth import FastLanguageModel
    except Exception as exc:  # unsloth raises NotImplementedError/ImportError without an NVIDIA GPU
        raise RuntimeError(
            f"the unsloth backend needs an NVIDIA GPU and `pip install 'sentiment_ray[gpu]'` ({type(exc).__name__}: "
            f"{exc}); use model.backend=hf on CPU"
        ) from exc
    _enable_varlen_attention()
    return FastLanguageModel


def _enable_varlen_attention() -> None:
    try:
        from unsloth.utils import attention_dispatch
    except ImportError:  # an Unsloth without this module has its own attention code
        return
    from sentiment_ray.model.backends.unsloth_varlen import enable_varlen_attention

    enable_varlen_attention(attention_dispatch)


def _dtype(model: ModelConfig):
    from sentiment_ray.model.backends.common import torch_dtype

    return None if model.dtype == "auto" else torch_dtype(model.dtype)  # None lets Unsloth pick bf16/fp16


def load_for_training(model: ModelConfig, lora: LoraSettings, *, max_length: int, gradient_checkpointing: bool,
                      seed: int):
    from sentiment_ray.model.backends.common import resolve_model_path

    fast = _fast_language_model()
    extra = {}
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch

        # Under DDP (several Ray Train workers) each process loads onto its own GPU, the one the training worker
        # made current (train.train_worker), as Unsloth's DDP guide does with device_map={"": local_rank}.
        extra["device_map"] = {"": torch.cuda.current_device()}
    base, tokenizer = fast.from_pretrained(
        model_name=resolve_model_path(model.name_or_path),
        max_seq_length=max_length,
        dtype=_dtype(model),
        load_in_4bit=model.load_in_4bit,
        trust_remote_code=model.trust_remote_code,
        **extra,
    )
    peft_model = fast.get_peft_model(
        base,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=seed,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return peft_model, tokenizer


def load_for_scoring(model: ModelConfig, base_path: str, adapter_dir: str | None, *, max_length: int):
    from peft import PeftModel

    fast = _fast_language_model()
    base, tokenizer = fast.from_pretrained(
        model_name=base_path,
        max_seq_length=max_length,
        dtype=_dtype(model),
        load_in_4bit=model.load_in_4bit,
        trust_remote_code=model.trust_remote_code,
    )
    loaded = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False) if adapter_dir else base
    if adapter_dir and getattr(model, "merge_adapter", False):
        loaded = loaded.merge_and_unload()
    fast.for_inference(loaded)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer
