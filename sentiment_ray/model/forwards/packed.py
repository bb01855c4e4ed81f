"""Scoring forwards without padding: the reviews of a forward packed end to end into one row.

A padded forward computes every layer on its pad tokens too. Length-sorted groups keep that down, but not away:
the scoring job's batches of 160-256 rows, cut into forwards of 32,768 tokens, carry 20-29 % pad tokens on IMDB
(prompts of up to 384 tokens, a quarter of them clipped to 384), and on the 7B model every pad token costs the
same matmuls as a real one. Packed, a forward holds only real tokens: each review keeps its own positions (the
rotary embedding restarts at 0 for it) and attends only to itself, through the varlen flash attention kernel
(`aten._flash_attention_forward` with cumulative sequence offsets: one call per layer for the whole pack,
grouped-query attention handled by the kernel). That is what vLLM and Unsloth's padding-free training do; here it
goes through transformers' own attention dispatch (`AttentionInterface`), so the decoder layers stay
transformers' code and can still be compiled (`forward: compiled_packed`).

Without flash attention (CPU, float32) each prompt of the pack attends through its own causal SDPA call: on 2 CPU
cores, SmolLM2 in batches of 16 with prompts of up to 384 tokens (56 % pad tokens when padded), `packed` ran 1.47x
eager's forward; with 128-token prompts (3 % padding) 0.97x (docs/BENCHMARKS.md §16). A mask over the whole pack,
quadratic in it, was slower than eager in a trial. Inside a compiled forward the per-prompt bounds would break the
graph, so there the pack is masked as a whole, up to MASKED_PACK_TOKENS tokens (a 131,072-token mask: 17 GB).

Measured on an H200 (docs/BENCHMARKS.md §16): the 7B scoring job's steady rate 1.76x eager with `compiled_packed`
(170 vs 97 reviews/s), its bare forward 1.29x `packed` alone and 1.56x compiled; scores as close to a float32
forward as eager's, not bit-equal to them (a different matmul shape rounds bf16 differently).
"""

from __future__ import annotations

from dataclasses import dataclass

from sentiment_ray.config import ForwardUnavailable

ATTENTION_NAME = "sentiment_ray_packed"
MASKED_PACK_TOKENS = 8192  # the largest pack a compiled non-flash forward masks as a whole (a 64 MiB boolean mask)


@dataclass
class PackedBatch:
    """The prompts of one forward, end to end: what the decoder and the attention kernel need."""

    input_ids: object  # [1, tokens]
    position_ids: object  # [1, tokens]: 0, 1, ... within each prompt
    cu_seq_lens: object  # [prompts + 1] int32: where each prompt starts in the pack, then the total
    max_length: int  # an upper bound of the prompt lengths (the flash kernel's grid)
    last_positions: object  # [prompts]: each prompt's last token in the pack


def pack_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices per packed forward, in order: each pack holds at most `max_tokens` tokens (a longer row alone)."""
    packs, current, tokens = [], [], 0
    for row, length in enumerate(lengths):
        if current and tokens + length > max_tokens:
            packs.append(current)
            current, tokens = [], 0
        current.append(row)
        tokens += length
    return packs + [current] if current else packs


def packed_batch(prompts: list, device, max_length: int = 0) -> PackedBatch:
    """The prompts packed on `device`; `max_length`: a bound to pass the kernel instead of the longest prompt
    (one constant keeps a compiled graph from specializing on each pack's longest row)."""
    import numpy as np
    import torch

    lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
    positions = np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(starts, lengths)
    cu_seq_lens = np.concatenate([[0], ends]).astype(np.int32)

    def on_device(array):
        return torch.from_numpy(array).to(device, non_blocking=True)

    return PackedBatch(on_device(tokens[None]), on_device(positions[None]), on_device(cu_seq_lens),
                       max(int(lengths.max()), max_length), on_device(ends - 1))


# The children of a pre-norm decoder layer whose forward is attention + residual, then MLP + residual (Llama,
# Mistral, Qwen2, Qwen3): only such a layer's MLP may be run on a subset of positions.
PRE_NORM_LAYER = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


def packed_last_hidden(decoder, batch: PackedBatch):
    """The decoder's final hidden state [prompts, hidden] at each prompt's last token: transformers' own steps (as
    in graphed_forward.causal_decoder_hidden) with per-prompt positions, and the pack's offsets handed to each
    layer's attention, which `install_packed_attention` routed to `packed_attention`.

    Of the last layer only the last tokens' outputs are read, and its MLP (four fifths of a Mistral layer's
    matmuls) needs nothing else, so it runs on those alone: 2.5 % of the 7B forward's matmuls saved."""
    hidden = decoder.embed_tokens(batch.input_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=batch.position_ids)
    attention = {"position_ids": batch.position_ids, "position_embeddings": position_embeddings,
                 "cu_seq_lens_q": batch.cu_seq_lens, "cu_seq_lens_k": batch.cu_seq_lens,
                 "max_length_q": batch.max_length, "max_length_k": batch.max_length}
    *layers, last_layer = decoder.layers[:decoder.config.num_hidden_layers]
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, use_cache=False, **attention)
    if {name for name, _ in last_layer.named_children()} != PRE_NORM_LAYER:
        hidden = last_layer(hidden, attention_mask=None, use_cache=False, **attention)
        return decoder.norm(hidden[0, batch.last_positions])
    attended, _ = last_layer.self_attn(hidden_states=last_layer.input_layernorm(hidden), attention_mask=None,
                                       **attention)
    hidden = (hidden + attended)[0, batch.last_positions]
    return decoder.norm(hidden + last_layer.mlp(last_layer.post_attention_layernorm(hidden)))


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention signature (query [1, heads, tokens, head_dim], output [1, tokens, heads, head_dim]):
    causal attention within each prompt of the pack. Called without offsets (not from packed_last_hidden),
    it is SDPA as before."""
    import torch

    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed forward is one row of prompts end to end, got {query.shape[0]} rows")
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        # [tokens, heads, head_dim] views; the kernel takes fewer key/value heads than query heads as they are.
        output = torch.ops.aten._flash_attention_forward(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_seq_lens_q, cu_seq_lens_k,
            max_length_q, max_length_k, 0.0, True, False, scale=scaling)[0]
        return output.unsqueeze(0), None
    tokens = query.shape[2]
    gqa = key.shape[1] != query.shape[1]
    if not torch.compiler.is_compiling() or tokens > MASKED_PACK_TOKENS:
        bounds = cu_seq_lens_q.tolist()
        output = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], is_causal=True, scale=scaling,
            enable_gqa=gqa) for start, stop in zip(bounds[:-1], bounds[1:])], dim=2)
        return output.transpose(1, 2), None
    positions = torch.arange(tokens, device=query.device)
    prompt_of = torch.searchsorted(cu_seq_lens_q[1:].to(torch.int64), positions, right=True)
    mask = (prompt_of[:, None] == prompt_of[None, :]) & (positions[None, :] <= positions[:, None])
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return output.transpose(1, 2), None


def check_packable(decoder, forward: str = "packed") -> None:
    """The pack's offsets reach the attention through transformers' own layer and attention code; a model whose
    layers or attention were replaced (Unsloth patches transformers' classes) would drop them and let reviews
    attend to each other, so it is refused."""
    layer = decoder.layers[0]
    for module in (layer, getattr(layer, "self_attn", None)):
        owner = getattr(getattr(module, "forward", None), "__module__", None) or "?"
        if not owner.startswith("transformers."):
            raise ForwardUnavailable(f"forward={forward} runs transformers' own decoder layers; this model's "
                             f"{type(module).__name__}.forward comes from {owner} (model.backend: hf, not unsloth)")


def install_packed_attention(decoder) -> str:
    """Route the decoder's attention through `packed_attention` (registered with transformers'
    AttentionInterface); returns the implementation it replaced, for `restore_attention`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    previous = decoder.config._attn_implementation
    decoder.config._attn_implementation = ATTENTION_NAME
    return previous


def restore_attention(decoder, previous: str) -> None:
    decoder.config._attn_implementation = previous
