"""The base model's hub id: from the name a config gives, from what a local folder says, or from the config."""

import json

import pytest

from sentiment_ray.config import ConfigError, FinetuneConfig, load_config
from sentiment_ray.model import embedded as embedded_model
from sentiment_ray.model.hub_id import is_hub_id, known_hub_id
from sentiment_ray.model.names import EMBEDDED_MODEL, TINY_MODEL
from sentiment_ray.training.job import resolve_base_model
from tests.conftest import REPO_ROOT


def _folder(path, config=None, source=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    if source is not None:
        (path / embedded_model.SOURCE_FILE).write_text(json.dumps(source))
    return path


def test_names_that_are_hub_ids():
    assert known_hub_id(EMBEDDED_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert known_hub_id(TINY_MODEL) is None  # random weights built here
    assert known_hub_id("unsloth/mistral-7b-v0.3-bnb-4bit") == "unsloth/mistral-7b-v0.3-bnb-4bit"
    assert known_hub_id("gpt2") == "gpt2"  # transformers takes an id without organisation too
    assert known_hub_id("/no/such/model") is None and known_hub_id("../models/x") is None
    assert is_hub_id("org/name-1.5") and not is_hub_id("org/../x") and not is_hub_id("/abs/path")


def test_local_folders_say_what_they_are(tmp_path):
    # The embedded model's cache folder (what the demo passes as model.name_or_path).
    built = _folder(tmp_path / "smollm2", source={"source": embedded_model.WHEEL_REQUIREMENT, "dtype": "bfloat16"})
    assert known_hub_id(str(built)) == embedded_model.HUB_ID
    # A huggingface_hub cache snapshot.
    snapshot = _folder(tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123")
    assert known_hub_id(str(snapshot)) == "Qwen/Qwen2.5-0.5B"
    # config.json's _name_or_path as older transformers saved it.
    saved = _folder(tmp_path / "saved", config={"_name_or_path": "mistralai/Mistral-7B-v0.3"})
    assert known_hub_id(str(saved)) == "mistralai/Mistral-7B-v0.3"
    # Hints that are no hub id: a GGUF's display name, a local path, nothing at all.
    gguf = _folder(tmp_path / "gguf", config={"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2"})
    local = _folder(tmp_path / "local", config={"_name_or_path": str(tmp_path / "gguf")})
    assert known_hub_id(str(gguf)) is None and known_hub_id(str(local)) is None
    assert known_hub_id(str(_folder(tmp_path / "plain"))) is None


def test_finetune_records_the_hub_id_of_the_name_as_given(tiny_model_dir):
    model = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml",
                        ["model.name_or_path=some-org/some-model"]).model
    assert resolve_base_model(model).base_model_id == "some-org/some-model"
    local = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml",
                        [f"model.name_or_path={tiny_model_dir}"]).model
    resolved = resolve_base_model(local)
    assert resolved.name_or_path == str(tiny_model_dir) and resolved.base_model_id is None
    # model.base_model_id names a local copy of a hub model, and wins over what is derived.
    override = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml",
                           [f"model.name_or_path={tiny_model_dir}", "model.base_model_id=my-org/tiny"]).model
    assert resolve_base_model(override).base_model_id == "my-org/tiny"


def test_a_base_model_id_that_is_no_hub_id_is_refused():
    with pytest.raises(ConfigError, match="model.base_model_id must be a hub id"):
        load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml",
                    ["model.base_model_id=/local/path"])
