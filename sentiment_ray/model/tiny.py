"""A tiny random-weight Mistral with its own byte-level BPE tokenizer, built in seconds with no download.

It has the reference model's architecture (all seven LoRA projections exist) at ~0.5 M parameters, so tests
and CPU benchmarks exercise the real code paths quickly. Training a tokenizer on a small fixed corpus keeps
" positive" and " negative" single tokens, as in real BPE vocabularies.
"""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE_WORDS = ["great", "wonderful", "superb", "brilliant", "moving", "delightful", "excellent", "charming"]
NEGATIVE_WORDS = ["awful", "terrible", "boring", "dull", "clumsy", "dreadful", "tedious", "pointless"]
FILLER_WORDS = ["the", "movie", "film", "plot", "actors", "was", "really", "quite", "and", "story", "ending", "a"]


def synthetic_reviews(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Trivially separable reviews: the sentiment words of one class mixed with neutral filler."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = POSITIVE_WORDS if label else NEGATIVE_WORDS
        tokens = rng.choices(FILLER_WORDS, k=rng.randint(3, 8)) + rng.choices(words, k=rng.randint(1, 3))
        rng.shuffle(tokens)
        texts.append(" ".join(tokens).capitalize() + ".")
        labels.append(label)
    return texts, labels


def _tokenizer_corpus() -> list[str]:
    texts, _ = synthetic_reviews(400, seed=123)
    cues = ["Review: x\nSentiment: positive", "Review: y\nSentiment: negative"] * 50
    return texts + cues + [" ".join(POSITIVE_WORDS + NEGATIVE_WORDS + FILLER_WORDS)] * 20


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_heads: int = 4,
                     num_layers: int = 2) -> Path:
    """`hidden_size=256` gives 64-dim heads, the smallest shape fused GPU kernels (Unsloth) are made for."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    specials = ["<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # Prepend BOS as Llama/Mistral tokenizers do, so the leading-special-token path is exercised too.
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
