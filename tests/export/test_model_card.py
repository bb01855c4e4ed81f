"""Model cards: the adapter folder's README.md as the Hub reads it, with what the adapter is and how it was made."""

import dataclasses
import json

import pytest
import yaml

from sentiment_ray.config import ModelConfig
from sentiment_ray.export.model_card import adapter_card, write_adapter_card
from sentiment_ray.model.metadata import ADAPTER_CONFIG, AdapterMetadata, name_base_in_adapter_config, read_metadata
from sentiment_ray.model.prompt import PromptSpec

SPEC = PromptSpec(template="Text: {text}\nMood:", label_words=(" bad", " good"), max_length=99)


def _metadata(**changes) -> AdapterMetadata:
    metadata = AdapterMetadata(
        base_model="/cache/models/smollm2-135m-instruct", base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        backend="hf", prompt=SPEC, label_token_ids=[11, 12], lora={"r": 8, "alpha": 16},
        data={"source": "data/train.parquet", "files": ["data/train.parquet"], "rows": 256, "positives": 128,
              "fingerprint": "0123456789abcdef", "text_column": "text", "label_column": "label", "limit": None,
              "shuffle_seed": 0, "excerpt_share": 0.0, "excerpts": 0},
        training={"epochs": 2.0, "learning_rate": 0.0003, "model": {"name_or_path": "/cache/models/smollm2"}},
        metrics={"train_loss": 0.4321, "steps": 64, "peak_gpu_memory_gb": None},
        command="sentiment-ray finetune --config configs/finetune/smollm2_cpu.yaml train.epochs=2",
    )
    return dataclasses.replace(metadata, **changes)


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_the_card_has_the_hubs_front_matter_and_what_made_the_adapter():
    front, body = _split(adapter_card(_metadata()))
    assert front["library_name"] == "peft" and front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["pipeline_tag"] == "text-generation" and {"sentiment-analysis", "lora", "peft"} <= set(front["tags"])
    assert "```text\nText: {text}\nMood:\n```" in body  # the template as the model sees it
    assert '`" bad"` (token 11) = negative, `" good"` (token 12) = positive' in body
    assert "`0123456789abcdef`" in body and "rows: 256, of them 128 positive" in body
    assert "| train_loss | 0.4321 |" in body and "| steps | 64 |" in body
    assert "peak_gpu_memory_gb" not in body  # unknown metrics are left out, not shown as None
    assert "sentiment-ray finetune --config configs/finetune/smollm2_cpu.yaml train.epochs=2" in body
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["lora"] == {"r": 8, "alpha": 16} and config["train"] == {"epochs": 2.0, "learning_rate": 0.0003}
    assert config["prompt"]["template"] == SPEC.template and config["data"]["train"] == "data/train.parquet"
    # Loading it: with this package, and with peft on the hub base.
    assert "sentiment-ray predict --adapter" in body
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in body
    assert "logits[0, -1, [11, 12]]" in body


def test_without_a_hub_id_the_front_matter_names_no_base():
    front, body = _split(adapter_card(_metadata(base_model_id=None, command=None, data={}, metrics={})))
    assert "base_model" not in front  # the Hub refuses a local path there
    assert "hub id: not known" in body and "`/cache/models/smollm2-135m-instruct`" in body
    assert "was not recorded" in body and "Not recorded." in body and "None recorded." in body
    assert 'AutoModelForCausalLM.from_pretrained("/cache/models/smollm2-135m-instruct")' in body


def test_a_hub_dataset_is_named_in_the_front_matter():
    front, _ = _split(adapter_card(_metadata(data={"source": "hf:stanfordnlp/imdb", "fingerprint": "f"})))
    assert front["datasets"] == ["stanfordnlp/imdb"]


def test_the_saved_adapter_folder_names_its_hub_base_and_still_scores_from_the_local_one(random_adapter, tmp_path):
    """What finetune saves (train.save_adapter_folder): peft's template card replaced by ours, adapter_config.json
    naming the hub id; scoring still loads the base from the local path in the metadata (the tests run offline,
    so the hub id could not be loaded), with the same scores as before."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.model.scorer import SentimentScorer
    from sentiment_ray.training.job import save_adapter_folder

    before = read_metadata(random_adapter)
    base = AutoModelForCausalLM.from_pretrained(before.base_model)
    peft_model = PeftModel.from_pretrained(base, random_adapter)
    metadata = dataclasses.replace(before, base_model_id="example-org/tiny-random-mistral", command="sentiment-ray x")
    folder = tmp_path / "saved"
    save_adapter_folder(peft_model, AutoTokenizer.from_pretrained(before.base_model), metadata, folder)

    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert adapter_config["base_model_name_or_path"] == "example-org/tiny-random-mistral"
    front, body = _split((folder / "README.md").read_text())
    assert front["base_model"] == "example-org/tiny-random-mistral" and front["library_name"] == "peft"
    assert "Model Card for Model ID" not in body  # peft's template is gone
    assert read_metadata(folder).base_model_id == "example-org/tiny-random-mistral"

    model = ModelConfig(name_or_path="", backend="hf", dtype="float32")
    texts = ["great superb film", "dull and tedious."]
    saved = SentimentScorer.from_adapter(folder, model).score_texts(texts).scores
    original = SentimentScorer.from_adapter(random_adapter, model).score_texts(texts).scores
    assert saved == pytest.approx(original, abs=1e-6) and saved[0] != pytest.approx(0.5, abs=1e-3)


def test_writing_replaces_pefts_card_and_changes_only_the_base_name(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": "/tmp/local", "r": 4}))
    write_adapter_card(tmp_path, _metadata())
    name_base_in_adapter_config(tmp_path, "org/model")
    assert "Model Card for Model ID" not in (tmp_path / "README.md").read_text()
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text()) == {"base_model_name_or_path": "org/model", "r": 4}
