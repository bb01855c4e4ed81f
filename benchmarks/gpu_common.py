"""Shared pieces of the GPU benchmarks: a random-weight Mistral-7B, an IMDB-trained 32k BPE, the matmul rate.

No weights can be downloaded on the GPU machine, so the 7B model has Mistral-7B's exact architecture
(transformers' `MistralConfig` defaults, 7.24e9 parameters) with random weights; its tokenizer is a byte-level
BPE with Mistral's vocabulary size trained on the IMDB reviews, so reviews have realistic token counts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def build_imdb_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 32000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts + ["Review: x\nSentiment: positive", "Review: y\nSentiment: negative"] * 100,
                            trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_random_mistral_7b(out_dir: Path, texts: list[str]) -> Path:
    """Random Mistral-7B saved as bf16 safetensors (built on the GPU: seconds, not minutes)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    started = time.perf_counter()
    tokenizer = build_imdb_tokenizer(texts, out_dir)
    config = MistralConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    assert config.vocab_size >= len(tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MistralForCausalLM(config)
    torch.set_default_dtype(previous)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    (out_dir / "bench_info.json").write_text(json.dumps({"parameters": params}))
    del model
    torch.cuda.empty_cache()
    print(f"[bench] random Mistral-7B ({params / 1e9:.2f}e9 params) built in {time.perf_counter() - started:.0f} s")
    return out_dir


def model_parameters(model_dir: Path) -> int:
    return json.loads((model_dir / "bench_info.json").read_text())["parameters"]


def bf16_matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)
