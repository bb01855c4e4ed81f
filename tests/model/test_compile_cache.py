"""The compile cache (sentiment_ray/model/forwards/compile_cache.py): a second scorer of the same model compiles
nothing."""

import os

import pytest
import torch

from sentiment_ray.config import ModelConfig
from sentiment_ray.model.forwards import compile_cache
from sentiment_ray.model.forwards.compile_cache import CompileCacheCounts, compile_cache_dir, use_compile_cache
from sentiment_ray.model.scorer import SentimentScorer
from tests.model.test_scorer import TEXTS


def _forget_compiled_code():
    """What a new process starts with: no dynamo frames, no inductor graphs in memory (the disk cache stays)."""
    from torch._inductor.utils import clear_caches

    torch._dynamo.reset()
    clear_caches()


def test_the_cache_lives_in_the_products_cache_folder_keyed_by_torch_and_device(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("SENTIMENT_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there itself
    folder = use_compile_cache(torch.device("cpu"))
    assert folder == tmp_path / "cache" / "torch-compile" / f"torch-{torch.__version__}-cuda-none-cpu"
    assert folder == compile_cache_dir() and folder.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice wins
    assert use_compile_cache(torch.device("cpu")) == tmp_path / "mine"


def test_the_counts_say_hit_or_miss():
    assert CompileCacheCounts(3, 0).describe() == "cache hit (3 graphs loaded)"
    assert CompileCacheCounts(1, 2).describe() == "cache miss (2 graphs compiled and saved, 1 loaded)"
    assert CompileCacheCounts(0, 0).describe() == "no cache lookups"
    assert CompileCacheCounts(5, 2).since(CompileCacheCounts(3, 2)) == CompileCacheCounts(2, 0)


@pytest.mark.parametrize("forward", ["compiled_packed"])  # the GPU configs' forward; `compiled` shares the cache path
def test_a_second_scorer_of_the_same_model_loads_its_compiled_layers_from_the_cache(random_adapter, monkeypatch,
                                                                                  tmp_path, caplog, forward):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # an empty cache: a cold machine
    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    _forget_compiled_code()
    with caplog.at_level("INFO", logger="sentiment_ray.model.forwards.compiled"):
        cold = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=128, forward=forward)
    # The warm-up compiled as the scorer loaded, so scoring compiles nothing more.
    assert cold.compile_cache.misses > 0 and cold.compile_cache.hits == 0
    graphs = cold._compiled.graphs
    assert "compile cache miss" in caplog.text and str(tmp_path / "inductor") in caplog.text
    scores = cold.score_texts(TEXTS).scores
    assert cold._compiled.graphs == graphs
    assert any((tmp_path / "inductor").rglob("*")), "nothing was saved"

    _forget_compiled_code()  # a second job on the same machine
    caplog.clear()
    with caplog.at_level("INFO", logger="sentiment_ray.model.forwards.compiled"):
        warm = SentimentScorer.from_adapter(random_adapter, model, max_batch_tokens=128, forward=forward)
    assert warm.compile_cache.hits > 0 and warm.compile_cache.misses == 0
    assert "compile cache hit" in caplog.text
    assert warm.score_texts(TEXTS).scores == pytest.approx(scores, abs=1e-6)
    assert compile_cache.compile_cache_counts().hits >= warm.compile_cache.hits
