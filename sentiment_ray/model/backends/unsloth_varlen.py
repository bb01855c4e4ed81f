"""Padding-free attention in one kernel call per layer for Unsloth on torch 2.11, as torch >= 2.12 gets it.

Unsloth runs a padding-free batch (reviews packed into one row) through torch's varlen flash attention, one call
per layer for the whole batch, but only when `torch.nn.attention.varlen.varlen_attn` takes `enable_gqa` (torch
2.12). On torch 2.11 it falls back to one SDPA call per packed review: on an H200 that made SmolLM2-135M 53x
slower than padded batches, and the 7B model 29 % slower (docs/BENCHMARKS.md §7, §10), so the product had to
train padded and lost what padding-free saves (no pad tokens: less compute and memory).

The flash kernel itself handles grouped-query attention natively; only the Python wrapper of torch 2.11 lacks
the argument. Unsloth's eager path on torch >= 2.12 does not even call that wrapper: it calls aten's flash
forward and backward directly (`_LeanFlashVarlen`), deciding per call whether cuDNN would be the better kernel.
`enable_varlen_attention` gives Unsloth's dispatch that same path on torch 2.11: the lean flash call for eager
training (cuDNN never, as torch 2.13 decides on every GPU), and for compiled code a `varlen_attn` that takes
`enable_gqa` by repeating the key/value heads. It changes nothing where Unsloth found a varlen kernel itself.
Measured in docs/BENCHMARKS.md §15.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger(__name__)


def varlen_attn_with_gqa(varlen_attn: Callable) -> Callable:
    """torch 2.11's `varlen_attn` (packed [tokens, heads, head_dim] tensors) with torch 2.12's `enable_gqa`:
    with fewer key/value heads than query heads, each key/value head serves its group of query heads."""

    def varlen_attn_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
        heads, kv_heads = query.shape[-2], key.shape[-2]
        if kv_heads != heads:
            if not enable_gqa or heads % kv_heads:
                raise ValueError(f"{heads} query heads and {kv_heads} key/value heads need enable_gqa=True and "
                                 "a whole number of query heads per key/value head")
            key = key.repeat_interleave(heads // kv_heads, dim=-2)
            value = value.repeat_interleave(heads // kv_heads, dim=-2)
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                           window_size=window_size)

    return varlen_attn_gqa


def _torch_varlen_attn() -> Callable | None:
    """torch's varlen_attn when it is the torch 2.11 one (window_size, no enable_gqa) and flash is built in."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params or "enable_gqa" in params:
        return None
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)():
        return None
    return varlen_attn


def enable_varlen_attention(dispatch: ModuleType, torch_varlen: Callable | None = None) -> bool:
    """Gives Unsloth's attention dispatch (`unsloth.utils.attention_dispatch`) a varlen kernel where it found
    none only because torch 2.11's wrapper lacks `enable_gqa`. True if it was installed."""
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
        return False  # torch >= 2.12 (or a later Unsloth): its own kernel stays
    missing = [name for name in ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN", "_LeanFlashVarlen", "_varlen_attn_call")
               if not hasattr(dispatch, name)]
    if missing:
        logger.warning("padding-free attention stays one call per review: this Unsloth's attention dispatch lacks "
                       "%s", ", ".join(missing))
        return False
    torch_varlen = torch_varlen or _torch_varlen_attn()
    if torch_varlen is None:
        return False
    dispatch._TORCH_VARLEN_ATTN = varlen_attn_with_gqa(torch_varlen)
    # The lean path asks whether cuDNN would take the call; torch 2.13 answers no on every GPU, and 2.11 has
    # no cuDNN varlen at all.
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    dispatch._LEAN_VARLEN = True
    logger.info("padding-free attention: one varlen flash call per layer (torch 2.11 varlen with GQA)")
    return True
