import dataclasses
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sentiment_ray.config import ConfigError, ForwardUnavailable, ModelConfig, ScoreConfig, ScoringModelConfig
from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.forwards.shapes import ShapeBuckets
from sentiment_ray.model.scorer import STATUS_EMPTY, STATUS_OK, SentimentScorer
from tests.conftest import RANDOM_ADAPTER_SPEC as SPEC

TEXTS = ["great superb film", "dull.", "the plot was really tedious and the actors awful " * 6, "a",
         "Charming<br />moving story"]


def _direct_probability(model, encoder, text):
    """The reference: a plain full forward of base+adapter over one unpadded prompt."""
    (prompt,) = encoder.encode_prompts(encoder.clean_texts([text]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1]
    return torch.softmax(logits[list(encoder.label_token_ids)].double(), -1)[1].item()


def test_batched_scores_equal_a_direct_forward_pass(random_adapter, tiny_model_dir):
    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    result = scorer.score_texts(TEXTS)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), random_adapter).eval()
    expected = [_direct_probability(reference, scorer.encoder, t) for t in TEXTS]
    assert result.statuses == [STATUS_OK] * len(TEXTS)
    assert result.scores == pytest.approx(expected, abs=1e-5)
    assert result.truncated == [False, False, True, False, False]
    # The adapter changes the answer: the comparison is not base against base.
    base_only = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert max(abs(a - _direct_probability(base_only, scorer.encoder, t)) for a, t in zip(expected, TEXTS)) > 1e-3


def test_labels_follow_scores(random_adapter):
    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    result = scorer.score_texts(TEXTS)
    for score, label in zip(result.scores, result.labels()):
        assert label == ("positive" if score >= 0.5 else "negative")
    middle = sorted(result.scores)[2]  # a threshold that splits the five scores 2 / 3
    assert result.labels(middle).count("positive") == 3 and result.labels(1.0).count("positive") == 0
    assert scorer.identity.startswith("random-adapter@")


def test_null_and_empty_texts_keep_their_rows(random_adapter):
    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    result = scorer.score_texts([None, "good", "   ", "<br />", "bad"])
    assert result.statuses == [STATUS_EMPTY, STATUS_OK, STATUS_EMPTY, STATUS_EMPTY, STATUS_OK]
    assert [s is None for s in result.scores] == [True, False, True, True, False]
    assert result.labels()[0] is None and result.labels()[2] is None
    assert scorer.score_texts([None]).scores == [None]


def test_tokenizer_that_disagrees_with_training_is_refused(random_adapter, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(AdapterError, match="tokenizer differs"):
        SentimentScorer(model, tokenizer, SPEC, "x", expected_label_ids=[1, 2])


def test_zero_shot_uses_the_base_model(tiny_model_dir):
    scorer = SentimentScorer.zero_shot(ModelConfig(name_or_path=str(tiny_model_dir), backend="hf", dtype="float32"),
                                       SPEC)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = [_direct_probability(base, scorer.encoder, t) for t in TEXTS[:2]]
    assert scorer.score_texts(TEXTS[:2]).scores == pytest.approx(expected, abs=1e-5)
    assert scorer.identity.startswith("zero-shot:")


def test_prompt_changes_are_seen_by_scoring(random_adapter):
    """Scoring uses the adapter's saved prompt, not the caller's default."""
    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    assert scorer.encoder.spec == SPEC and dataclasses.asdict(scorer.encoder.spec)["max_length"] == 40


def test_merged_adapter_scores_like_the_unmerged_one(random_adapter):
    from sentiment_ray.config import ScoringModelConfig

    texts = TEXTS[:3]
    unmerged = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    merged = SentimentScorer.from_adapter(
        random_adapter, ScoringModelConfig(backend="hf", dtype="float32", merge_adapter=True))
    assert not hasattr(merged.model, "peft_config")  # really merged: a plain transformers model
    assert merged.score_texts(texts).scores == pytest.approx(unmerged.score_texts(texts).scores, abs=1e-5)


def test_length_sorted_forward_groups_respect_the_budget_and_change_nothing(random_adapter):
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    whole = SentimentScorer.from_adapter(random_adapter, model)
    split = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=60)
    lengths = [len(p.input_ids) for p in split.encoder.encode_prompts(split.encoder.clean_texts(TEXTS))]
    groups = split.forward_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(TEXTS))) and len(groups) > 1
    assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 60 for g in groups)
    assert whole.forward_groups(lengths) == [list(range(len(TEXTS)))]
    assert split.score_texts(TEXTS).scores == pytest.approx(whole.score_texts(TEXTS).scores, abs=1e-5)


# ---------------------------------------------------------------------------------- bad rows


def test_bad_rows_get_a_status_and_no_score(random_adapter):
    from sentiment_ray.model.scorer import STATUS_INVALID_UTF8, STATUS_NON_STRING

    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    texts = ["good", 7, b"bytes are fine", b"bad \xff", "bad \udcff", "\ud800 alone", None, "très bien", "bad"]
    result = scorer.score_texts(texts)
    assert result.statuses == [STATUS_OK, STATUS_NON_STRING, STATUS_OK, STATUS_INVALID_UTF8, STATUS_INVALID_UTF8,
                               STATUS_INVALID_UTF8, STATUS_EMPTY, STATUS_OK, STATUS_OK]
    assert [s is None for s in result.scores] == [False, True, False, True, True, True, True, False, False]
    assert result.errors == [None, None, None, "invalid UTF-8 byte 0xff at byte 4",
                             "invalid UTF-8 byte 0xff at byte 4",  # "\udcff": byte 0xff under surrogateescape
                             "lone surrogate U+D800 at character 0", None, None, None]
    # valid UTF-8 bytes are the text they encode; the bad rows do not change the others' scores
    assert result.scores[2] == pytest.approx(scorer.score_texts(["bytes are fine"]).scores[0], abs=1e-6)
    assert result.scores[0] == pytest.approx(scorer.score_texts(["good"]).scores[0], abs=1e-6)
    assert scorer.score_texts([1, 2]).statuses == [STATUS_NON_STRING] * 2  # a batch with nothing to score
    assert scorer.score_texts([b"\xc3\x28"]).errors == ["invalid UTF-8 byte 0xc3 at byte 0"]


def test_text_that_tokenizes_to_nothing_is_marked(random_adapter, monkeypatch):
    from sentiment_ray.model.scorer import STATUS_NO_TOKENS

    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    tokenizer = scorer.encoder.tokenizer
    real_call = type(tokenizer).__call__

    def drops_the_vanishing_word(self, text, *args, **kwargs):  # a tokenizer whose normalizer removes a text
        encoded = real_call(self, text, *args, **kwargs)
        if isinstance(text, list):
            encoded["input_ids"] = [[] if t.strip() == "vanishing" else ids
                                    for t, ids in zip(text, encoded["input_ids"])]
        return encoded

    monkeypatch.setattr(type(tokenizer), "__call__", drops_the_vanishing_word)
    result = scorer.score_texts(["good", "vanishing", "bad"])
    assert result.statuses == [STATUS_OK, STATUS_NO_TOKENS, STATUS_OK] and result.scores[1] is None


def test_a_100k_character_review_is_scored_by_the_truncation_policy(random_adapter):
    """The character cut before tokenizing keeps exactly the tokens that token truncation keeps."""
    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    review = "What a start. " + "the middle drags on and on. " * 3600 + "A wonderful ending!"
    assert len(review) > 100_000
    result = scorer.score_texts([review])
    assert result.statuses == [STATUS_OK] and result.truncated == [True]
    (uncut,) = scorer.encoder.encode_prompts(scorer.encoder.clean_texts([review]))  # no character cut here
    (cut,) = scorer.encoder.encode_prompts([scorer.encoder.spec.clean(scorer.preparer._clip_chars(review))])
    assert len(scorer.preparer._clip_chars(review)) < len(review) and cut.input_ids == uncut.input_ids
    assert result.scores[0] == pytest.approx(scorer.score_texts([review[:50_000] + review[-50_000:]]).scores[0])


def test_a_failing_batch_is_retried_whole_then_row_by_row():
    from sentiment_ray.model.scorer import STATUS_ERROR, BatchScores, score_with_retry

    calls = []

    def flaky(texts):  # fails once for everything, then only for "poison"
        calls.append(list(texts))
        if len(calls) == 1 or "poison" in texts:
            raise ValueError("boom")
        return BatchScores([0.5] * len(texts), [STATUS_OK] * len(texts), [False] * len(texts))

    assert score_with_retry(flaky, ["a", "b"], on_retry=lambda _: None).statuses == [STATUS_OK, STATUS_OK]
    assert len(calls) == 2  # a transient failure costs one retry of the whole batch

    calls.clear()
    calls.append("first call already happened")  # from here on only "poison" fails
    result = score_with_retry(flaky, ["a", "poison", "c"], on_retry=lambda _: None)
    assert result.statuses == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert result.scores == [0.5, None, 0.5] and result.errors == [None, "ValueError: boom", None]


LONG_AND_SHORT = [f"{'good ' * n}film, {'dull ' * (n % 7)}plot" for n in range(1, 90, 3)]  # widths 8 to ~190 tokens


@pytest.mark.parametrize("budget", [256, 1024])
def test_static_shapes_score_as_the_eager_groups(random_adapter, budget):
    """The CPU twin of the CUDA-graph path: the same fixed shapes (dummy rows, rounded widths), not captured."""
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    eager = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=budget, forward="eager")
    static = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=budget, forward="static_shapes")
    assert (eager.forward_mode, static.forward_mode) == ("eager", "static_shapes")
    static.buckets = ShapeBuckets(budget, width_step=16, row_step=4)  # steps to the tiny prompt budget
    forwards = static.buckets.plan([len(p) for p in static.preparer.prepare(LONG_AND_SHORT).input_ids])
    assert any(f.padded_rows > len(f.rows) for f in forwards)  # dummy rows are exercised
    assert len({f.width for f in forwards}) >= 2
    expected, actual = eager.score_texts(LONG_AND_SHORT), static.score_texts(LONG_AND_SHORT)
    assert actual.statuses == expected.statuses == [STATUS_OK] * len(LONG_AND_SHORT)
    assert actual.scores == pytest.approx(expected.scores, abs=1e-5)


def test_compiled_decoder_layers_score_as_eager_with_one_graph_for_every_layer_and_shape(random_adapter):
    """The CPU twin of the GPU test of `forward: compiled`: inductor's CPU backend, float32, the adapter unmerged
    (LoRA layers inside the compiled ones)."""
    torch._dynamo.reset()  # dynamo's cache is per process: a graph compiled by an earlier test would be reused
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    eager = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=128, forward="eager")
    compiled = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=128, forward="compiled")
    texts = ["ok", "bad", "a fine film"] * 5 + ["good " * n + "plot" for n in range(2, 30, 3)] + LONG_AND_SHORT[::4]
    lengths = [len(p) for p in eager.preparer.prepare(texts).input_ids]
    groups = eager.forward_groups(lengths)
    assert len({(len(g), max(lengths[j] for j in g)) for g in groups}) >= 3  # forwards of several shapes
    expected, actual = eager.score_texts(texts), compiled.score_texts(texts)
    assert actual.scores == pytest.approx(expected.scores, abs=1e-5)
    assert len(compiled._compiled.layers) >= 2 and compiled.capture_seconds > 0
    # One dynamic graph serves every layer and shape (plus one for a single-row forward, if any: torch
    # specializes sizes of 1); a later batch of new shapes compiles nothing.
    graphs, seconds = compiled._compiled.graphs, compiled.capture_seconds
    assert graphs <= 2  # compiled by the warm-up as the scorer loaded: for any rows, and for a single row
    assert compiled.score_texts(texts[3:12]).scores == pytest.approx(expected.scores[3:12], abs=1e-5)
    assert (compiled._compiled.graphs, compiled.capture_seconds) == (graphs, seconds)


def test_a_compiler_that_fails_before_anything_compiled_leaves_the_eager_forward(random_adapter, caplog,
                                                                                 monkeypatch):
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    eager = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=128, forward="eager")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler found")

    def failing_compile(module, *args, **kwargs):
        module._compiled_call_impl = no_compiler  # what a failing inductor build raises through

    monkeypatch.setattr(torch.nn.Module, "compile", failing_compile)
    with caplog.at_level("WARNING", logger="sentiment_ray.model.forwards.compiled"):
        # the warm-up compile, as the scorer loads, is where it fails
        compiled = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=128, forward="compiled")
        scores = compiled.score_texts(LONG_AND_SHORT).scores
    assert scores == eager.score_texts(LONG_AND_SHORT).scores
    assert not compiled._compiled.active and compiled.capture_seconds == 0.0
    assert all(layer._compiled_call_impl is None for layer in compiled._compiled.layers)
    assert "compiling the decoder layers failed (RuntimeError: no C compiler found); scoring eager" in caplog.text


def test_compiled_layers_on_static_shapes_score_as_eager(random_adapter):
    """The CPU twin of `forward: compiled_graphs` up to the capture: the compiled layers run the padded fixed
    shapes (dummy rows, rounded widths) that the GPU then captures, one graph for all of them."""
    torch._dynamo.reset()
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    eager = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=256, forward="eager")
    compiled = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=256, forward="compiled")
    compiled.buckets = ShapeBuckets(256, width_step=16, row_step=4)
    forwards = compiled.buckets.plan([len(p) for p in compiled.preparer.prepare(LONG_AND_SHORT).input_ids])
    assert any(f.padded_rows > len(f.rows) for f in forwards) and len({f.shape for f in forwards}) >= 2
    warmed_up = compiled._compiled.graphs  # the scorer's warm-up: one dynamic graph, one for a single row
    assert warmed_up <= 2
    assert compiled.score_texts(LONG_AND_SHORT).scores == pytest.approx(eager.score_texts(LONG_AND_SHORT).scores,
                                                                        abs=1e-5)
    assert compiled._compiled.graphs == warmed_up  # every shape of the batch ran through the warmed-up graphs


def test_use_forward_switches_a_loaded_scorer_in_place(random_adapter):
    torch._dynamo.reset()
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    scorer = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=256, forward="compiled")
    layers = scorer._compiled.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    scorer.use_forward("static_shapes", ShapeBuckets(256, width_step=16, row_step=8))
    assert scorer.forward_mode == "static_shapes" and scorer._compiled is None
    assert all(layer._compiled_call_impl is None for layer in layers)  # back to eager layers
    assert (scorer.buckets.width_step, scorer.buckets.row_step) == (16, 8)
    scorer.use_forward("eager")
    assert scorer.buckets is None and scorer._graphs is None


@pytest.mark.parametrize("forward", ["compiled", "compiled_graphs"])
def test_compiled_forwards_are_refused_for_quantized_or_unsloth_bases(forward):
    for model in ({"load_in_4bit": True}, {"backend": "unsloth"}):
        with pytest.raises(ConfigError, match=f"forward={forward} needs an unquantized base"):
            ScoreConfig(input="in", output="out", forward=forward, max_batch_tokens=4096,
                        model=ScoringModelConfig(**model)).validate()


def test_forward_is_eager_by_default_and_graphs_without_cuda_fall_back_to_eager_in_one_line(random_adapter, caplog):
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    eager = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=512)
    assert eager.forward_mode == "eager"
    with pytest.raises(ValueError, match="forward must be one of"):
        SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=512, forward="jit")
    expected = eager.score_texts(LONG_AND_SHORT).scores
    for graphed in ("cuda_graphs", "compiled_graphs"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="sentiment_ray.model.scorer"):
            scorer = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=512, forward=graphed)
        # a GPU config's forward on a CPU actor: the job goes on, eager, and says why in one line
        assert (scorer.forward_mode, scorer.requested_forward, scorer._compiled) == ("eager", graphed, None)
        assert [r.getMessage() for r in caplog.records] == [
            f"forward={graphed} cannot run here (forward={graphed} needs the model on a CUDA device; it is on cpu); "
            "scoring with the eager forward"]
        assert scorer.score_texts(LONG_AND_SHORT).scores == expected
        with pytest.raises(ForwardUnavailable, match=f"forward={graphed} needs the model on a CUDA device"):
            scorer.use_forward(graphed)  # switching by hand stays strict
    with pytest.raises(ValueError, match="needs max_batch_tokens"):  # a config error is not a fallback
        SentimentScorer.from_adapter(random_adapter, model, forward="static_shapes")


def test_temperature_and_threshold_come_from_the_adapter(random_adapter, tmp_path):
    import shutil

    from sentiment_ray.model.metadata import read_metadata

    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    plain = SentimentScorer.from_adapter(random_adapter, model).score_texts(TEXTS).scores
    calibrated_dir = tmp_path / "calibrated"
    shutil.copytree(random_adapter, calibrated_dir)
    metadata = read_metadata(calibrated_dir)
    metadata.temperature, metadata.threshold = 2.5, 0.7
    metadata.write(calibrated_dir)
    scorer = SentimentScorer.from_adapter(calibrated_dir, model)
    assert (scorer.temperature, scorer.threshold) == (2.5, 0.7)
    calibrated = scorer.score_texts(TEXTS).scores
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert [logit(c) for c in calibrated] == pytest.approx([logit(p) / 2.5 for p in plain], abs=1e-6)


def test_the_capturable_decoder_steps_equal_the_decoders_own_forward(random_adapter):
    """What CUDA graph forwards run instead of the decoder's forward (no mask builder): the same hidden states, so
    that a capture records the eager forward's kernels. The GPU tests capture it."""
    from sentiment_ray.model.forwards.graphed import causal_decoder_hidden, check_plain_causal_decoder

    scorer = SentimentScorer.from_adapter(random_adapter, ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    prepared = scorer.preparer.prepare(LONG_AND_SHORT).input_ids
    input_ids, _ = scorer._padded(prepared)
    with torch.inference_mode():
        expected = scorer._decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        actual = causal_decoder_hidden(scorer._decoder, input_ids)
    assert input_ids.shape[0] == len(LONG_AND_SHORT) and torch.equal(actual, expected)
    check_plain_causal_decoder(scorer._decoder, 512)
    scorer._decoder.config.sliding_window = 64
    with pytest.raises(ValueError, match="sliding window of 64 tokens, shorter than prompts of up to 512"):
        check_plain_causal_decoder(scorer._decoder, 512)
