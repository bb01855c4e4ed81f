"""Packed scoring forwards (sentiment_ray/model/forwards/packed.py) on CPU: the packing, the attention within each
prompt, and the scores against the padded eager forward. The flash kernel itself runs in tests/test_gpu.py."""

import pytest
import torch

from sentiment_ray.config import ConfigError, ModelConfig, ScoreConfig, ScoringModelConfig
from sentiment_ray.model.forwards import packed as packed_forward
from sentiment_ray.model.forwards.packed import ATTENTION_NAME, pack_rows, packed_attention, packed_batch
from sentiment_ray.model.scorer import SentimentScorer
from tests.model.test_scorer import LONG_AND_SHORT

FLOAT32 = ModelConfig(name_or_path="", backend="hf", dtype="float32")


def test_pack_rows_fills_each_pack_up_to_the_budget_in_order():
    assert pack_rows([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert pack_rows([9, 2, 2], 7) == [[0], [1, 2]]  # a row over the budget goes alone
    assert pack_rows([], 7) == []


def test_packed_batch_restarts_positions_and_marks_each_prompts_last_token():
    batch = packed_batch([[5, 6, 7], [8], [9, 10]], torch.device("cpu"), max_length=16)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch.cu_seq_lens.tolist() == [0, 3, 4, 6] and batch.cu_seq_lens.dtype == torch.int32
    assert batch.last_positions.tolist() == [2, 3, 5]
    assert batch.max_length == 16 and packed_batch([[1] * 20], torch.device("cpu"), 16).max_length == 20


@pytest.mark.parametrize("compiling, masked_pack_tokens", [(False, 8192), (True, 8192), (True, 4)])
def test_packed_attention_attends_within_each_prompt_only(monkeypatch, compiling, masked_pack_tokens):
    """Grouped-query shapes (4 query heads, 2 key/value heads): each prompt's output equals causal SDPA over that
    prompt alone, whether attended prompt by prompt (eager; compiled beyond MASKED_PACK_TOKENS) or masked as a whole
    (compiled)."""
    monkeypatch.setattr(packed_forward, "MASKED_PACK_TOKENS", masked_pack_tokens)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7]
    query, key, value = (torch.randn(1, heads, sum(lengths), 8, generator=generator) for heads in (4, 2, 2))
    cu_seq_lens = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    output, weights = packed_attention(None, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu_seq_lens,
                                       cu_seq_lens_k=cu_seq_lens, max_length_q=7, max_length_k=7)
    assert output.shape == (1, 13, 4, 8) and weights is None
    for start, stop in zip(cu_seq_lens[:-1].tolist(), cu_seq_lens[1:].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:stop], key[:, :, start:stop].repeat_interleave(2, 1),
            value[:, :, start:stop].repeat_interleave(2, 1), is_causal=True, scale=0.3)
        torch.testing.assert_close(output[:, start:stop], alone.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_packed_forward_scores_as_the_padded_eager_forward_and_switches_back(random_adapter, monkeypatch):
    """The last layer's MLP runs on each prompt's last token only (a Mistral layer's layout), else on all."""
    eager = SentimentScorer.from_adapter(random_adapter, FLOAT32, max_batch_tokens=256)
    packed = SentimentScorer.from_adapter(random_adapter, FLOAT32, max_batch_tokens=256, forward="packed")
    lengths = [len(p) for p in packed.preparer.prepare(LONG_AND_SHORT).input_ids]
    assert len(pack_rows(lengths, 256)) >= 3  # several packs, most of several prompts
    expected = eager.score_texts(LONG_AND_SHORT)
    actual = packed.score_texts(LONG_AND_SHORT + ["", "fine"])  # a marked row and a one-token pack member
    assert actual.scores[:-2] == pytest.approx(expected.scores, abs=1e-5)
    assert actual.statuses[-2:] == ["empty_text", "ok"] and actual.scores[-1] == pytest.approx(
        eager.score_texts(["fine"]).scores[0], abs=1e-5)
    assert packed.logit_margins(LONG_AND_SHORT[:4]) == pytest.approx(eager.logit_margins(LONG_AND_SHORT[:4]), abs=1e-5)
    assert packed._decoder.config._attn_implementation == ATTENTION_NAME
    monkeypatch.setattr(packed_forward, "PRE_NORM_LAYER", {"another", "layout"})  # the whole last layer, then
    assert packed.score_texts(LONG_AND_SHORT).scores == pytest.approx(expected.scores, abs=1e-5)
    packed.use_forward("eager")  # the decoder's own attention back, and with it the padded forwards' scores
    assert packed._decoder.config._attn_implementation == eager._decoder.config._attn_implementation
    assert packed.score_texts(LONG_AND_SHORT).scores == pytest.approx(expected.scores, abs=1e-6)


def test_compiled_packed_layers_score_as_eager_with_one_graph_for_every_pack(random_adapter):
    """The CPU twin of `forward: compiled_packed`: the pack's offsets and bound pass through the compiled layers
    as inputs, so packs of other sizes and prompt counts reuse the one graph."""
    torch._dynamo.reset()
    eager = SentimentScorer.from_adapter(random_adapter, FLOAT32, max_batch_tokens=256)
    compiled = SentimentScorer.from_adapter(random_adapter, FLOAT32, max_batch_tokens=256, forward="compiled_packed")
    assert compiled.score_texts(LONG_AND_SHORT).scores == pytest.approx(eager.score_texts(LONG_AND_SHORT).scores,
                                                                        abs=1e-5)
    graphs = compiled._compiled.graphs  # compiled by the warm-up: any pack, and a pack of a single prompt
    assert graphs <= 2 and compiled.capture_seconds > 0
    texts = LONG_AND_SHORT[5:17:2] + ["a fine film", "dull"]
    assert compiled.score_texts(texts).scores == pytest.approx(eager.score_texts(texts).scores, abs=1e-5)
    assert compiled._compiled.graphs == graphs


def test_packed_forwards_need_a_budget_and_a_plain_causal_decoder(random_adapter):
    for forward in ("packed", "compiled_packed"):
        with pytest.raises(ConfigError, match=f"forward={forward} needs max_batch_tokens"):
            ScoreConfig(input="in", output="out", forward=forward).validate()
        with pytest.raises(ValueError, match=f"forward={forward} needs max_batch_tokens"):
            SentimentScorer.from_adapter(random_adapter, FLOAT32, forward=forward)
    with pytest.raises(ConfigError, match="forward=compiled_packed needs an unquantized base"):
        ScoreConfig(input="in", output="out", forward="compiled_packed", max_batch_tokens=4096,
                    model=ScoringModelConfig(load_in_4bit=True)).validate()
    with pytest.raises(ConfigError, match="forward=packed needs the hf backend"):
        ScoreConfig(input="in", output="out", forward="packed", max_batch_tokens=4096,
                    model=ScoringModelConfig(backend="unsloth")).validate()
    scorer = SentimentScorer.from_adapter(random_adapter, FLOAT32, max_batch_tokens=256)
    attention = scorer._decoder.layers[0].self_attn
    attention.forward = lambda *args, **kwargs: None  # what a patched attention looks like to the check
    attention.forward.__module__ = "unsloth.models.llama"
    with pytest.raises(ValueError, match=r"forward=packed runs transformers' own decoder layers; this model's "
                                         r"MistralAttention.forward comes from unsloth.models.llama"):
        scorer.use_forward("packed")
    del attention.forward
    scorer._decoder.config.sliding_window = 8
    with pytest.raises(ValueError, match="forward=packed runs plain causal attention; this model attends within a "
                                         "sliding window of 8 tokens"):
        scorer.use_forward("packed")
