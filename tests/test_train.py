"""The finetune job on the tiny model, through Ray Train, then scored: proves labels, masks and scoring agree."""

import json
from pathlib import Path

import pytest

from sentiment_ray.config import FinetuneConfig, ModelConfig, load_config
from sentiment_ray.metadata import read_metadata
from sentiment_ray.outputs import OutputExistsError
from sentiment_ray.scorer import SentimentScorer
from sentiment_ray.tiny_model import synthetic_reviews
from sentiment_ray.train import run_finetune
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(600)


def _config(tiny_model_dir, train_file, output_dir, *extra):
    return load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}", f"output_dir={output_dir}",
        "data.limit=null", *extra,
    ])


@pytest.fixture(scope="module")
def trained(ray_session, tiny_model_dir, synthetic_train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "adapter"
    cfg = _config(tiny_model_dir, synthetic_train_file, out, "train.epochs=4", "train.batch_size=16",
                  "train.learning_rate=0.005", "lora.r=8", "lora.alpha=16")
    return run_finetune(cfg), cfg


def test_learning_check_reaches_90_percent_on_separable_data(trained, tiny_model_dir):
    result, _ = trained
    texts, labels = synthetic_reviews(200, seed=99)  # held out: another seed than the training rows
    scorer = SentimentScorer.from_adapter(result["adapter_dir"], ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    scores = scorer.score_texts(texts).scores
    accuracy = sum(int(s >= 0.5) == y for s, y in zip(scores, labels)) / len(labels)
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f} after finetuning; loss {result['metrics']['train_loss']}"


def test_adapter_folder_and_metadata(trained, synthetic_train_file, tiny_model_dir):
    result, cfg = trained
    folder = result["adapter_dir"]
    meta = read_metadata(folder)
    assert meta.base_model == str(tiny_model_dir)
    assert meta.prompt == cfg.prompt and meta.backend == "hf"
    assert meta.data["rows"] == 256 and meta.data["files"] == [str(synthetic_train_file)]
    assert len(meta.data["fingerprint"]) == 16
    assert meta.metrics["steps"] == 64 and meta.metrics["train_loss"] > 0
    assert meta.metrics["first_step_seconds"] > 0 and meta.metrics["steady_tokens_per_second"] > 0
    folder = Path(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    assert (folder / "adapter_model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only


def test_peft_loads_the_adapter_as_it_is(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained[0]["adapter_dir"])
    assert model.peft_config["default"].r == 8


def test_existing_output_is_not_overwritten(trained, tiny_model_dir, synthetic_train_file):
    cfg = _config(tiny_model_dir, synthetic_train_file, trained[0]["adapter_dir"])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_finetune(cfg)
