"""transformers + peft (+ bitsandbytes 4-bit on GPU): the backend that runs anywhere."""

from __future__ import annotations

from sentiment_ray.config import LoraSettings, ModelConfig
from sentiment_ray.model.backends.common import load_tokenizer, torch_device, torch_dtype


def _load_base(model: ModelConfig, path: str):
    import torch
    from transformers import AutoModelForCausalLM

    device = torch_device(model.device)
    kwargs = {
        "dtype": torch_dtype(model.dtype, model.device),
        "trust_remote_code": model.trust_remote_code,
        "use_safetensors": True,  # never unpickle weights
    }
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if device != "cuda":
            raise RuntimeError("model.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false on CPU")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not model.load_in_4bit and device == "cuda":
        base = base.to("cuda")
    return base, load_tokenizer(model, path)


def load_for_training(model: ModelConfig, lora: LoraSettings, *, max_length: int, gradient_checkpointing: bool,
                      seed: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from sentiment_ray.model.backends.common import resolve_model_path

    base, tokenizer = _load_base(model, resolve_model_path(model.name_or_path))
    if model.load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # The LoRA A matrices start random: seeded, so a run (and a resumed run's reference) is reproducible.
    from transformers import set_seed

    set_seed(seed)
    return get_peft_model(base, peft_config), tokenizer


def load_for_scoring(model: ModelConfig, base_path: str, adapter_dir: str | None, *, max_length: int):
    from peft import PeftModel

    base, tokenizer = _load_base(model, base_path)
    loaded = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False) if adapter_dir else base
    if adapter_dir and getattr(model, "merge_adapter", False):
        loaded = loaded.merge_and_unload()
    loaded.eval()
    return loaded, tokenizer
