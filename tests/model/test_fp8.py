"""`model.quantization: fp8` on the CPU: the row-wise float8 arithmetic (scales, e4m3 rounding and range, a
matmul's error against float32), which layers it replaces, the one-line fallback where it cannot run, and the
product path (adapter merged, linears replaced, compiled forward traced) with the device check lifted, on a CPU
build of torch whose `torch._scaled_mm` runs (2.13's does). The GPU twin is tests/test_gpu.py's fp8 test."""

import logging

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from sentiment_ray.config import ScoringModelConfig
from sentiment_ray.model import fp8
from sentiment_ray.model.fp8 import (
    APPLIED_FP8,
    E4M3_MAX,
    Fp8Linear,
    fp8_modules,
    patched_layers,
    quantize_for_scoring,
    quantize_linears,
    quantize_rowwise,
    to_e4m3,
)
from sentiment_ray.model.scorer import SentimentScorer
from tests.conftest import RANDOM_ADAPTER_SPEC as SPEC

TEXTS = ["great superb film", "dull.", "the plot was really tedious and the actors awful " * 6, "a",
         "Charming<br />moving story", "the ending was quite moving and the actors brilliant", "pointless"]
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_MANTISSA_BITS = 3


def _scaled_mm_runs_here() -> bool:
    try:
        Fp8Linear.from_linear(torch.nn.Linear(32, 16, bias=False))(torch.ones(3, 32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


needs_cpu_scaled_mm = pytest.mark.skipif(not _scaled_mm_runs_here(),
                                         reason=f"torch {torch.__version__} has no CPU torch._scaled_mm")


# ------------------------------------------------------------------------------------------ the arithmetic


def test_each_rows_absolute_maximum_becomes_e4m3s_largest_value():
    torch.manual_seed(0)
    values = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 0.0])[:, None]
    values[4, 17] = -250.0  # one outlier sets its row's scale
    quantized, scales = quantize_rowwise(values)
    assert quantized.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 and scales.shape == (6, 1)
    amax = values.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(scales[:5], amax[:5] / E4M3_MAX, rtol=1e-6)
    row_max = quantized.float().abs().amax(dim=1)
    assert row_max[:5].tolist() == [E4M3_MAX] * 5 and quantized[4, 17].float().item() == -E4M3_MAX
    # A row of zeros: a tiny positive scale, zeros out, nothing divided by zero.
    assert scales[5].item() > 0 and quantized[5].float().abs().max().item() == 0.0
    assert torch.isfinite(quantized.float()).all()


def test_values_beyond_e4m3s_range_are_clamped_to_it_not_nan():
    scale = torch.ones(1, 1)
    out = to_e4m3(torch.tensor([[1000.0, -1e6, 448.0001, float("inf"), 1.0]]), scale).float()
    assert out.tolist() == [[E4M3_MAX, -E4M3_MAX, E4M3_MAX, E4M3_MAX, 1.0]]


def test_the_round_trip_error_is_half_e4m3s_spacing():
    """e4m3 keeps 3 mantissa bits: a normal value is rounded by at most 2^-4 of itself; below the smallest normal
    (2^-6 of the scale) the spacing is fixed at 2^-9 of the scale, so the error is at most 2^-10 of it."""
    torch.manual_seed(1)
    values = torch.randn(32, 256) * torch.exp(torch.randn(32, 256) * 2)  # six decades of magnitudes per row
    quantized, scales = quantize_rowwise(values)
    back = quantized.float() * scales
    error = (back - values).abs()
    normal = values.abs() / scales >= E4M3_MIN_NORMAL
    assert normal.float().mean() > 0.5 and (~normal).any()  # both ranges are exercised
    bound = 2.0 ** -(E4M3_MANTISSA_BITS + 1)
    slack = 1 + 1e-5  # float32's own rounding of the division and the scaling back
    assert (error[normal] <= bound * values.abs()[normal] * slack).all()
    assert (error[~normal] <= 2.0 ** -10 * scales.expand_as(values)[~normal] * slack).all()
    # and it is rounding, not truncation: the mean relative error is well below the bound
    assert (error[normal] / values.abs()[normal]).mean() < bound / 2


def test_an_fp8_matmul_is_within_5_percent_of_float32_and_about_20x_bf16s_error():
    """A matmul of random normal data through Fp8Linear's arithmetic (its float32 emulation, `reference`):
    relative Frobenius error against float32 ~3.7 % measured (both operands rounded by up to 2^-4 each), bf16's
    ~0.17 %. The bounds: below 5 %, and above 1 % (so the test sees fp8 at all)."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(512, 256, bias=True)
    x = torch.randn(4, 16, 512)
    exact = x @ linear.weight.t() + linear.bias
    module = Fp8Linear.from_linear(linear)
    emulated = module.reference(x)
    assert emulated.shape == (4, 16, 256) and module.weight.dtype == torch.float8_e4m3fn

    def relative(out):
        return ((out.float() - exact).norm() / exact.norm()).item()

    bf16 = relative(torch.nn.functional.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()))
    assert 0.01 < relative(emulated) < 0.05 and bf16 < 0.005
    assert module.weight_scale.shape == (1, 256) and module.weight_scale.is_contiguous()
    assert torch.allclose(module.dequantized_weight(), linear.weight, rtol=2.0 ** -4, atol=1e-3)


@needs_cpu_scaled_mm
def test_the_scaled_mm_forward_computes_what_the_emulation_does():
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    module = Fp8Linear.from_linear(linear)
    out = module(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 48)
    # Same e4m3 operands and scales; only the accumulation order and the bf16 rounding of the result may differ.
    assert torch.allclose(out.float(), module.reference(x).float(), rtol=2.0 ** -7, atol=1e-2)


def test_only_plain_linears_whose_shapes_scaled_mm_takes_are_replaced():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 20),
                                torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.LayerNorm(48)),
                                torch.nn.Embedding(10, 32))
    assert quantize_linears(model) == (2, 1)  # 48 -> 20: 20 output features is not a multiple of 16
    assert [type(m).__name__ for m in model] == ["Fp8Linear", "ReLU", "Linear", "Sequential", "Embedding"]
    assert isinstance(model[3][0], Fp8Linear) and type(model[3][1]) is torch.nn.LayerNorm
    assert len(fp8_modules(model)) == 2


# ------------------------------------------------------------------------------------------ where it cannot run


def test_on_a_cpu_fp8_is_one_warning_line_and_the_scores_of_no_quantization(random_adapter, caplog):
    plain = SentimentScorer.from_adapter(random_adapter, ScoringModelConfig(backend="hf"))
    with caplog.at_level(logging.INFO):
        scorer = SentimentScorer.from_adapter(random_adapter, ScoringModelConfig(backend="hf", quantization="fp8"))
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("sentiment_ray")]
    assert warnings == [warnings[0]] and warnings[0].startswith("model.quantization=fp8 cannot run here (no CUDA)")
    assert "compute capability >= 8.9" in warnings[0] and warnings[0].endswith("scoring in float32 without it")
    assert plain.quantization == "none" and scorer.quantization == "none (fp8 unavailable: no CUDA)"
    assert not fp8_modules(scorer.model)
    assert scorer.score_texts(TEXTS).scores == plain.score_texts(TEXTS).scores


def test_reasons_fp8_cannot_run(monkeypatch):
    cpu = torch.device("cpu")
    assert fp8.unavailable_reason(cpu, torch.bfloat16) == "no CUDA"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fp8.unavailable_reason(cpu, torch.bfloat16) == "the model is on cpu, not CUDA"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert fp8.unavailable_reason(cuda, torch.bfloat16) == ("NVIDIA A100-SXM4-80GB has compute capability 8.0, "
                                                            "fp8 matmuls need 8.9+")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.unavailable_reason(cuda, torch.float32) == ("the model is float32, fp8 replaces a bfloat16 model's "
                                                           "linears")
    # Everything claims fp8 here but the kernel does not run (no CUDA in this torch): the probe says so.
    assert fp8.unavailable_reason(cuda, torch.bfloat16).startswith("torch._scaled_mm failed: ")


class _PatchedLayer(torch.nn.Module):  # as Unsloth leaves a decoder layer: its forward from another package
    def forward(self, x):
        return x


def test_a_decoder_whose_layers_run_other_code_than_transformers_is_named(tiny_model_dir):
    decoder = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_decoder()
    assert patched_layers(decoder) is None
    decoder.layers[0] = _PatchedLayer()
    assert patched_layers(decoder) == __name__


# ------------------------------------------------------------------------------------------ the product path


@pytest.fixture
def fp8_runs_here(monkeypatch):
    """The device check lifted: on this CPU, torch._scaled_mm runs the same arithmetic as on a GPU."""
    if not _scaled_mm_runs_here():
        pytest.skip(f"torch {torch.__version__} has no CPU torch._scaled_mm")
    monkeypatch.setattr(fp8, "unavailable_reason", lambda device, dtype: None)


def test_fp8_merges_the_adapter_then_quantizes_the_decoder_and_compiles(random_adapter, tiny_model_dir,
                                                                        fp8_runs_here):
    """The adapter is merged (its update quantized with its weight), the 14 projections of the 2 layers become
    Fp8Linear, the LM head stays bf16, and the compiled packed forward traces them into one graph (two: a pack of
    one prompt is specialised). Scores against a float32 forward: the tiny random model sits 4e-3 from it in fp8
    (4e-4 in bf16); bound 0.02. Compiled against eager fp8: bf16 rounding in other places, up to 1.2e-3; bound 5e-3."""
    reference = SentimentScorer.from_adapter(random_adapter, ScoringModelConfig(backend="hf", dtype="float32"))
    expected = reference.score_texts(TEXTS).scores
    model = ScoringModelConfig(backend="hf", dtype="bfloat16", quantization="fp8")
    eager = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=256)
    compiled = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=256, forward="compiled_packed")
    for scorer in (eager, compiled):
        assert scorer.quantization == APPLIED_FP8
        assert not isinstance(scorer.model, PeftModel)  # merged
        assert len(fp8_modules(scorer.model)) == 14 == len(fp8_modules(scorer.model.get_decoder()))
        lm_head = scorer.model.get_output_embeddings()
        assert type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == torch.bfloat16
        assert scorer.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert compiled.forward_mode == "compiled_packed" and compiled._compiled.active
    assert compiled._compiled.graphs <= 2  # no graph break at the fp8 linears
    eager_scores, compiled_scores = eager.score_texts(TEXTS).scores, compiled.score_texts(TEXTS).scores
    assert compiled._compiled.graphs <= 2
    assert max(abs(a - b) for a, b in zip(eager_scores, expected)) < 0.02
    assert max(abs(a - b) for a, b in zip(compiled_scores, eager_scores)) < 5e-3
    # The fp8 scores are not the bf16 ones: the quantization did take effect.
    bf16 = SentimentScorer.from_adapter(random_adapter, ScoringModelConfig(backend="hf", dtype="bfloat16"))
    assert max(abs(a - b) for a, b in zip(eager_scores, bf16.score_texts(TEXTS).scores)) > 1e-4


def test_layers_of_other_shapes_stay_bf16_and_the_applied_setting_says_how_many(fp8_runs_here):
    # 12-dim heads with 2 key/value heads: k_proj and v_proj have 24 output features, not a multiple of 16.
    config = MistralConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model, applied = quantize_for_scoring(model, "fp8")
    assert applied == f"{APPLIED_FP8} (10 of 14 decoder linears; 4 kept in bfloat16: dimensions not multiples of 16)"
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear)


def test_zero_shot_takes_the_setting_too(tiny_model_dir, fp8_runs_here):
    model = ScoringModelConfig(name_or_path=str(tiny_model_dir), backend="hf", dtype="bfloat16", quantization="fp8")
    scorer = SentimentScorer.zero_shot(model, SPEC)
    assert scorer.quantization == APPLIED_FP8 and len(fp8_modules(scorer.model)) == 14
    assert all(s is not None for s in scorer.score_texts(TEXTS).scores)


def test_an_unknown_setting_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="quantization must be one of"):
        SentimentScorer(model, AutoTokenizer.from_pretrained(tiny_model_dir), SPEC, "x", quantization="int4")
