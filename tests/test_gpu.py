"""GPU path (`pytest -m gpu` on a CUDA machine): Unsloth finetuning inside a Ray Train worker, GPU actor-pool
scoring through the Ray Data job, and the same adapter scored on the CPU path. Their CPU twins are
test_train.py and test_scoring.py, which run the same jobs with the hf backend."""

import pyarrow.parquet as pq
import pytest
import torch

from sentiment_ray.config import FinetuneConfig, ModelConfig, ScoreConfig, load_config
from sentiment_ray.model.metadata import read_metadata
from sentiment_ray.model.scorer import SentimentScorer
from sentiment_ray.model.tiny import build_tiny_model, synthetic_reviews
from sentiment_ray.scoring import run_scoring
from sentiment_ray.training.job import run_finetune
from tests.conftest import REPO_ROOT, write_reviews

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(1200),
]
# bf16 on the GPU against fp32 on the CPU: about 3 significant digits per probability.
GPU_CPU_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("small") / "model", hidden_size=256, num_heads=4)


@pytest.fixture(scope="module")
def gpu_adapter(ray_session, small_model, synthetic_train_file, tmp_path_factory):
    cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={small_model}", "model.backend=unsloth", "model.dtype=bfloat16",
        f"data.train={synthetic_train_file}", "data.limit=null", "train.max_steps=12", "train.batch_size=16",
        f"output_dir={tmp_path_factory.mktemp('gpu') / 'adapter'}", "ray.use_gpu=true",
    ])
    return run_finetune(cfg)


def test_unsloth_trains_in_a_ray_train_worker(gpu_adapter):
    meta = read_metadata(gpu_adapter["adapter_dir"])
    assert meta.backend == "unsloth" and meta.metrics["steps"] == 12
    assert meta.metrics["peak_gpu_memory_gb"] > 0


def test_gpu_scoring_job_matches_the_cpu_path(gpu_adapter, tmp_path):
    texts, _ = synthetic_reviews(300, seed=11)
    for part in range(3):
        write_reviews(tmp_path / f"in-{part}.parquet", texts[part::3], ids=[f"{part}-{i}" for i in range(100)])
    out = tmp_path / "scored"
    cfg = load_config(ScoreConfig, REPO_ROOT / "configs" / "score" / "tiny_test.yaml", [
        f"adapter={gpu_adapter['adapter_dir']}", f"input={tmp_path / 'in-*.parquet'}", f"output={out}",
        "pool_size=1", "num_gpus_per_actor=1", "model.backend=unsloth", "model.dtype=bfloat16",
    ])
    summary = run_scoring(cfg)
    assert summary.rows_out == 300
    gpu = {r["id"]: r["score"] for r in pq.read_table(out).to_pylist()}

    cpu_scorer = SentimentScorer.from_adapter(
        gpu_adapter["adapter_dir"], ModelConfig(name_or_path="", backend="hf", dtype="float32", device="cpu"))
    cpu_scores = cpu_scorer.score_texts([texts[part::3][i] for part in range(3) for i in range(100)]).scores
    ids = [f"{part}-{i}" for part in range(3) for i in range(100)]
    worst = max(abs(gpu[i] - c) for i, c in zip(ids, cpu_scores))
    assert worst < GPU_CPU_TOLERANCE, f"GPU and CPU probabilities differ by up to {worst:.4f}"


def test_padding_free_unsloth_training_follows_the_padded_run(ray_session, small_model, synthetic_train_file,
                                                             tmp_path):
    """The same 12 steps (same rows, order, seed) padded and padding-free: packing changes the kernels' shapes,
    not the training, so the mean losses agree (bf16 kernels, a few percent)."""
    losses = {}
    for padding_free in (False, True):
        cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
            f"model.name_or_path={small_model}", "model.backend=unsloth", "model.dtype=bfloat16",
            f"data.train={synthetic_train_file}", "data.limit=null", "train.max_steps=12", "train.batch_size=16",
            f"train.padding_free={str(padding_free).lower()}", "train.checkpoint_steps=0",
            f"output_dir={tmp_path / f'adapter-{padding_free}'}", "ray.use_gpu=true",
        ])
        losses[padding_free] = run_finetune(cfg)["metrics"]["train_loss"]
    print(f"mean training loss, padded {losses[False]:.4f}, padding-free {losses[True]:.4f}")
    assert losses[False] > 0.05  # a real label-token loss, not the 0 of labels all masked out
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


def test_hf_backend_on_gpu_matches_cpu(gpu_adapter):
    texts, _ = synthetic_reviews(32, seed=12)
    gpu = SentimentScorer.from_adapter(gpu_adapter["adapter_dir"],
                                       ModelConfig(name_or_path="", backend="hf", dtype="bfloat16", device="cuda"))
    cpu = SentimentScorer.from_adapter(gpu_adapter["adapter_dir"],
                                       ModelConfig(name_or_path="", backend="hf", dtype="float32", device="cpu"))
    assert gpu.device.type == "cuda"
    diffs = [abs(a - b) for a, b in zip(gpu.score_texts(texts).scores, cpu.score_texts(texts).scores)]
    assert max(diffs) < GPU_CPU_TOLERANCE


def test_unsloth_worker_killed_mid_training_resumes_from_its_checkpoint(ray_session, small_model, synthetic_train_file,
                                                                        gpu_adapter, tmp_path, monkeypatch):
    """The GPU twin of tests/training/test_train_checkpoints.py: Unsloth's patched Trainer restores the same state."""
    from sentiment_ray.ops.faults import MARKER, TRAIN_EXIT_AT_STEP

    monkeypatch.setenv(TRAIN_EXIT_AT_STEP, "7")
    monkeypatch.setenv(MARKER, str(tmp_path / "fault-marker"))
    cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={small_model}", "model.backend=unsloth", "model.dtype=bfloat16",
        f"data.train={synthetic_train_file}", "data.limit=null", "train.max_steps=12", "train.batch_size=16",
        "train.checkpoint_steps=5", "ray.max_failures=1", f"ray.storage_path={tmp_path / 'ray-results'}",
        f"output_dir={tmp_path / 'adapter'}", "ray.use_gpu=true",
    ])
    resumed = run_finetune(cfg)
    assert (tmp_path / "fault-marker").exists()
    assert resumed["metrics"]["resumed_from_step"] == 5 and resumed["metrics"]["steps"] == 12
    assert resumed["backend"] == "unsloth"

    # Same data order and optimizer state as the uninterrupted gpu_adapter run; bf16 GPU kernels are not
    # bit-reproducible, so the two adapters are compared by what they score.
    texts, _ = synthetic_reviews(64, seed=13)
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32", device="cpu")
    a = SentimentScorer.from_adapter(resumed["adapter_dir"], model).score_texts(texts).scores
    b = SentimentScorer.from_adapter(gpu_adapter["adapter_dir"], model).score_texts(texts).scores
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(f"resumed vs uninterrupted Unsloth adapter: scores differ by up to {worst:.5f}")
    assert worst < GPU_CPU_TOLERANCE


def _dev_reviews(rows: int) -> list[str]:
    """IMDB dev reviews: `.data/imdb` where the GPU command carries it, else the shared data beside the checkout."""
    for path in (REPO_ROOT / ".data" / "imdb" / "dev.parquet",
                 REPO_ROOT.parent / "shared" / "data" / "imdb" / "dev.parquet"):
        if path.exists():
            return pq.read_table(path, columns=["text"]).column("text").to_pylist()[:rows]
    pytest.fail("IMDB dev.parquet not found: carry .data/imdb/dev.parquet (docs/BENCHMARKS.md)")


def test_cuda_graph_forwards_score_as_the_eager_path(small_model):
    """2,000 real dev reviews of every length up to 384 tokens: replayed CUDA graphs of fixed shapes (dummy rows,
    rounded widths) give the eager path's scores within 1e-3 in bf16. The CPU twin is test_scorer.py's
    static-shapes test."""
    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.prompt import PromptSpec

    texts = _dev_reviews(2000)
    prompt = PromptSpec(max_length=384)

    def scorer(forward):
        model = ScoringModelConfig(name_or_path=str(small_model), backend="hf", dtype="bfloat16", device="cuda")
        return SentimentScorer.zero_shot(model, prompt, max_batch_tokens=65536, forward=forward)

    eager = scorer("eager").score_texts(texts).scores
    graphed_scorer = scorer("cuda_graphs")
    graphed = graphed_scorer.score_texts(texts).scores
    assert graphed_scorer.forward_mode == "cuda_graphs" and len(graphed_scorer._graphs.graphs) >= 6
    assert graphed_scorer.score_texts(texts).scores == graphed  # replays are deterministic
    spread = max(eager) - min(eager)
    worst = max(abs(a - b) for a, b in zip(eager, graphed))
    print(f"cuda_graphs vs eager on {len(texts)} dev reviews: max |diff| {worst:.2e}, "
          f"score spread {spread:.3f}, {len(graphed_scorer._graphs.graphs)} shapes captured in "
          f"{graphed_scorer.capture_seconds:.2f} s")
    assert spread > 0.01  # the scores differ between reviews: the comparison is not of constants
    assert worst < 1e-3


def test_compiled_and_packed_forwards_add_no_error_beyond_bf16s_own(small_model):
    """The same 2,000 dev reviews under `forward: compiled` (each decoder layer compiled, one dynamic graph,
    inductor emulating bf16 rounding), and packed without padding through the varlen flash kernel (`packed`,
    `compiled_packed`), measured against a float32 forward of the same model: neither may move the scores further
    from it than the eager bf16 forward is. Within 1e-3 of eager bf16 they are not: on the finetuned SmolLM2 eager
    bf16 itself sits up to 0.075 from float32 and compiled bf16 a similar distance, in other directions
    (docs/BENCHMARKS.md §14, §16). The CPU twins (float32, within 1e-5 of eager) are test_scorer.py's and
    test_packed_forward.py's."""
    import numpy as np

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.prompt import PromptSpec

    texts = _dev_reviews(2000)
    prompt = PromptSpec(max_length=384)

    def scorer(forward, dtype="bfloat16"):
        model = ScoringModelConfig(name_or_path=str(small_model), backend="hf", dtype=dtype, device="cuda")
        return SentimentScorer.zero_shot(model, prompt, max_batch_tokens=65536, forward=forward)

    reference = np.array(scorer("eager", "float32").score_texts(texts).scores)
    eager = np.array(scorer("eager").score_texts(texts).scores)
    eager_error = np.abs(eager - reference)
    assert np.ptp(reference) > 0.01  # the scores differ between reviews: the comparison is not of constants
    # compiled_graphs: the same compiled layers on padded fixed shapes, each replayed from a captured CUDA graph.
    for forward in ("compiled", "compiled_graphs", "packed", "compiled_packed"):
        torch._dynamo.reset()
        compiled_scorer = scorer(forward)
        compiled = np.array(compiled_scorer.score_texts(texts).scores)
        compiled_error = np.abs(compiled - reference)
        print(f"vs float32 on {len(texts)} dev reviews: eager bf16 mean {eager_error.mean():.2e} max "
              f"{eager_error.max():.2e}; {forward} bf16 mean {compiled_error.mean():.2e} max "
              f"{compiled_error.max():.2e}; {forward} vs eager max {np.abs(compiled - eager).max():.2e}; "
              f"{compiled_scorer._compiled.graphs if compiled_scorer._compiled else 0} graphs compiled, "
              f"{compiled_scorer.capture_seconds:.1f} s of compiling and capturing")
        assert compiled_scorer.forward_mode == forward
        if forward != "packed":
            assert compiled_scorer._compiled.active and compiled_scorer._compiled.graphs <= 2
        assert compiled_error.mean() <= 1.25 * eager_error.mean()
        assert compiled_error.max() <= 2 * eager_error.max()
        if forward == "compiled_graphs":
            assert len(compiled_scorer._graphs.graphs) >= 6
            assert compiled_scorer.score_texts(texts).scores == compiled.tolist()  # replays are deterministic


# fp8 scores against a float32 forward of small_model on these 2,000 dev reviews. The same arithmetic emulated on a
# CPU (torch 2.13's CPU torch._scaled_mm: the same e4m3 operands and scales, float32 accumulation, `forward:
# packed`) sat mean 8.3e-3, p99 1.9e-2, max 3.0e-2 from float32 (bf16 eager: max 2.3e-3, i.e. fp8 ~13x bf16's
# error on this random model; scores spread over 0.35). The bounds double the emulated figures, for what differs
# on the GPU: cuBLAS's accumulation order and fast accumulation (fp8.FAST_ACCUM), and inductor's fused bf16 rounding.
FP8_VS_FLOAT32_MAX = 0.06
FP8_VS_FLOAT32_MEAN = 0.02


def test_fp8_scores_stay_within_the_emulated_error_of_float32(small_model):
    """`model.quantization: fp8` with the 7B config's forward (`compiled_packed`): the decoder's linears become
    row-wise float8 matmuls (the scorer reports `fp8_rowwise`), the compiled layers trace them, and the scores stay
    within FP8_VS_FLOAT32_* of a float32 forward. Speed is benchmarks/gpu_fp8.py's to measure, not asserted here.
    The CPU twins: tests/model/test_fp8.py."""
    import numpy as np

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.fp8 import APPLIED_FP8, fp8_modules
    from sentiment_ray.model.prompt import PromptSpec

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"{torch.cuda.get_device_name()}: fp8 matmuls need compute capability >= 8.9")
    texts = _dev_reviews(2000)
    prompt = PromptSpec(max_length=384)

    def scorer(dtype, quantization, forward):
        model = ScoringModelConfig(name_or_path=str(small_model), backend="hf", dtype=dtype, device="cuda",
                                   quantization=quantization)
        return SentimentScorer.zero_shot(model, prompt, max_batch_tokens=65536, forward=forward)

    reference = np.array(scorer("float32", "none", "eager").score_texts(texts).scores)
    bf16 = np.array(scorer("bfloat16", "none", "eager").score_texts(texts).scores)
    torch._dynamo.reset()
    quantized = scorer("bfloat16", "fp8", "compiled_packed")
    assert quantized.quantization == APPLIED_FP8 and len(fp8_modules(quantized.model)) == 14
    assert quantized.forward_mode == "compiled_packed" and quantized._compiled.active
    scores = np.array(quantized.score_texts(texts).scores)
    assert quantized._compiled.graphs <= 2  # traced, no graph break at the fp8 linears
    error, bf16_error = np.abs(scores - reference), np.abs(bf16 - reference)
    print(f"fp8 compiled_packed vs float32 on {len(texts)} dev reviews: mean {error.mean():.2e}, p99 "
          f"{np.quantile(error, 0.99):.2e}, max {error.max():.2e}; bf16 eager: mean {bf16_error.mean():.2e}, max "
          f"{bf16_error.max():.2e}; label flips vs float32 {int(np.sum((scores >= 0.5) != (reference >= 0.5)))}")
    assert np.ptp(reference) > 0.01  # the scores differ between reviews: the comparison is not of constants
    assert error.max() < FP8_VS_FLOAT32_MAX and error.mean() < FP8_VS_FLOAT32_MEAN


def test_padding_free_attention_is_one_varlen_call_that_matches_sdpa_per_review():
    """Unsloth's varlen call for a padding-free batch (with torch 2.11 the product's shim, backends/unsloth_varlen.py)
    against one causal SDPA per packed review, grouped-query heads as in SmolLM2 and Mistral: outputs and
    gradients. The CPU twin is test_unsloth_varlen.py. Last in this file: it imports Unsloth into the test process,
    which patches transformers for every test after it."""
    import torch.nn.functional as F

    from sentiment_ray.model.backends.unsloth_backend import _fast_language_model

    _fast_language_model()
    from unsloth.utils import attention_dispatch

    assert attention_dispatch._TORCH_VARLEN_ATTN is not None  # torch's own (>= 2.12) or the shim's
    torch.manual_seed(0)
    heads, kv_heads, dim, lengths = 8, 2, 64, [37, 120, 5, 64, 64]
    total = sum(lengths)
    tensors = [torch.randn(total, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (heads, kv_heads, kv_heads)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    grad_out = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
    out = attention_dispatch._varlen_attn_call(*tensors, cu, max(lengths), scale=dim ** -0.5, window_size=(-1, 0),
                                               enable_gqa=True)
    grads = torch.autograd.grad(out, tensors, grad_out)
    references = [t.detach().float().requires_grad_() for t in tensors]
    expected, start = [], 0
    for length in lengths:
        q, k, v = (t[start:start + length].transpose(0, 1).unsqueeze(0) for t in references)
        expected.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        start += length
    expected = torch.cat(expected)
    expected_grads = torch.autograd.grad(expected, references, grad_out.float())
    print(f"varlen vs float32 SDPA per review: output max {(out.float() - expected).abs().max():.2e}, grads max "
          + ", ".join(f"{(g.float() - e).abs().max():.2e}" for g, e in zip(grads, expected_grads)))
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected_grad, rtol=0.02, atol=0.05)
