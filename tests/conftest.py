"""Shared fixtures: an isolated environment, the tiny random-weight model, a private local Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.prompt import PromptSpec
from sentiment_ray.tiny_model import build_tiny_model, synthetic_reviews

REPO_ROOT = Path(__file__).resolve().parents[1]
RANDOM_ADAPTER_SPEC = PromptSpec(max_length=40)


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Keep Ray's token, caches and temp files of this run out of the user's home and out of other runs."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HOME", "SENTIMENT_RAY_CACHE", "HF_HUB_OFFLINE", "RAY_ADDRESS")}
    os.environ["HOME"] = str(home)
    os.environ.setdefault("SENTIMENT_RAY_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("RAY_ADDRESS", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


def write_reviews(path: Path, texts, labels=None, ids=None, **extra) -> Path:
    columns = {"id": ids if ids is not None else [f"{path.stem}-{i}" for i in range(len(texts))], "text": texts}
    if labels is not None:
        columns["label"] = labels
    columns.update(extra)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One private Ray for the whole test session (starting Ray costs seconds); 3 logical CPUs on 2 cores so
    that two 1-CPU scoring actors never starve Ray Data's read tasks."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=3, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_train_file(tmp_path_factory) -> Path:
    texts, labels = synthetic_reviews(256, seed=1)
    return write_reviews(tmp_path_factory.mktemp("train") / "train.parquet", texts, labels)


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter with random (non-zero) LoRA weights, saved as `finetune` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.metadata import AdapterMetadata
    from sentiment_ray.prompt import PromptEncoder

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("adapter") / "random-adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encoder = PromptEncoder(RANDOM_ADAPTER_SPEC, tokenizer)
    AdapterMetadata(base_model=str(tiny_model_dir), backend="hf", prompt=RANDOM_ADAPTER_SPEC,
                    label_token_ids=list(encoder.label_token_ids)).write(folder)
    return folder
