"""The torch 2.11 varlen shim for Unsloth's padding-free attention (backends/unsloth_varlen.py), on CPU.

The GPU twin in tests/test_gpu.py runs Unsloth's own dispatch with the shim against per-review SDPA."""

import logging
import types

import pytest
import torch
import torch.nn.functional as F

from sentiment_ray.model.backends.unsloth_varlen import enable_varlen_attention, varlen_attn_with_gqa


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's contract on CPU: packed [tokens, heads, dim], causal per segment, equal head counts only."""
    assert key.shape[-2] == query.shape[-2], "the 2.11 wrapper takes no grouped-query attention"
    assert window_size == (-1, 0)
    out = torch.empty_like(query)
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


def test_grouped_query_heads_match_sdpa_per_review():
    torch.manual_seed(0)
    heads, kv_heads, dim, lengths = 6, 2, 16, [5, 9, 3]
    total = sum(lengths)
    query = torch.randn(total, heads, dim)
    key, value = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    out = varlen_attn_with_gqa(_reference_varlen)(query, key, value, cu, cu, 9, 9, scale=0.3, window_size=(-1, 0),
                                                   enable_gqa=True)
    start = 0
    for length in lengths:
        q, k, v = (x[start:start + length].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[start:start + length], expected[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
        start += length


def test_grouped_query_heads_without_enable_gqa_are_refused():
    query, key = torch.randn(4, 6, 8), torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="6 query heads and 2 key/value heads need enable_gqa=True"):
        varlen_attn_with_gqa(_reference_varlen)(query, key, key, cu, cu, 4, 4, window_size=(-1, 0))


def _dispatch(**overrides):
    names = dict(_TORCH_VARLEN_ATTN=None, _LEAN_VARLEN=False, _LeanFlashVarlen=object(), _varlen_attn_call=print)
    names.update(overrides)
    return types.SimpleNamespace(**names)


def test_installs_the_lean_flash_path_where_unsloth_found_no_varlen_kernel(caplog):
    dispatch = _dispatch()
    with caplog.at_level(logging.INFO, "sentiment_ray.model.backends.unsloth_varlen"):
        assert enable_varlen_attention(dispatch, torch_varlen=_reference_varlen) is True
    assert dispatch._LEAN_VARLEN is True
    assert dispatch._varlen_can_use_cudnn(None, None, None, 8, [-1, 0], True) is False
    assert dispatch._TORCH_VARLEN_ATTN is not None and dispatch._TORCH_VARLEN_ATTN is not _reference_varlen
    assert "one varlen flash call per layer" in caplog.text


def test_leaves_unsloths_own_varlen_kernel_alone():
    own = object()
    dispatch = _dispatch(_TORCH_VARLEN_ATTN=own, _LEAN_VARLEN=True)
    assert enable_varlen_attention(dispatch, torch_varlen=_reference_varlen) is False
    assert dispatch._TORCH_VARLEN_ATTN is own and not hasattr(dispatch, "_varlen_can_use_cudnn")


def test_an_unsloth_without_the_expected_dispatch_is_left_as_it_is(caplog):
    dispatch = _dispatch()
    del dispatch._LeanFlashVarlen
    with caplog.at_level(logging.WARNING, "sentiment_ray.model.backends.unsloth_varlen"):
        assert enable_varlen_attention(dispatch, torch_varlen=_reference_varlen) is False
    assert dispatch._TORCH_VARLEN_ATTN is None and dispatch._LEAN_VARLEN is False
    assert "lacks _LeanFlashVarlen" in caplog.text


def test_nothing_is_installed_without_a_torch_2_11_varlen_kernel():
    # This machine's torch (2.13, CPU) is not 2.11: its varlen_attn takes enable_gqa already, or flash is absent.
    dispatch = _dispatch()
    assert enable_varlen_attention(dispatch) is False
    assert dispatch._TORCH_VARLEN_ATTN is None
