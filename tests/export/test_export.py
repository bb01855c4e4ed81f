"""`sentiment-ray export`: the merged text-classification model loads with plain transformers (no custom code) and
its P(positive) is the adapter's `score` for prompts formatted with the template, padded together in one batch."""

import json
import math
import shutil
import time

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from sentiment_ray.cli import main
from sentiment_ray.config import ModelConfig
from sentiment_ray.export import classifier as export
from sentiment_ray.export.classifier import export_classifier
from sentiment_ray.io.outputs import OutputExistsError
from sentiment_ray.model.metadata import read_metadata
from sentiment_ray.predict import predict

MODEL = ModelConfig(name_or_path="", backend="hf", dtype="float32")
# Different lengths (one to 20 words), so that one padded batch holds rows with 0 to ~20 pads.
TEXTS = ["Great.", "dull.",
         "the plot was really tedious and the actors awful, a pointless and boring film to sit through",
         "Charming, moving story: superb actors!", "It was 10/10 -- I didn't expect that"]
TOLERANCE = 1e-4


def _formatted(folder, texts):
    """The prompt applied as a caller of the exported model applies it: from config.json, no sentiment_ray."""
    template = json.loads((folder / "config.json").read_text())["sentiment_ray_prompt_template"]
    return [template.replace("{text}", t) for t in texts]


def _classifier_probabilities(folder, texts):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tokenizer(_formatted(folder, texts), return_tensors="pt", padding=True)
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    with torch.no_grad():
        return model(**batch).logits.softmax(-1)[:, 1].tolist(), model


def _pipeline_probabilities(folder, texts):
    classify = pipeline("text-classification", model=str(folder), top_k=None, batch_size=len(texts))
    results = classify(_formatted(folder, texts))
    return [next(entry["score"] for entry in row if entry["label"] == "positive") for row in results]


@pytest.fixture(scope="module")
def exported(random_adapter, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "merged"
    return export_classifier(str(random_adapter), str(output)), output


def test_the_exported_model_gives_the_adapters_scores(exported, random_adapter):
    summary, folder = exported
    expected = [p.score for p in predict(TEXTS, str(random_adapter), model=MODEL)]
    probabilities, model = _classifier_probabilities(folder, TEXTS)
    assert type(model).__name__ == "MistralForSequenceClassification" == summary.architecture  # the tiny model's
    assert probabilities == pytest.approx(expected, abs=TOLERANCE)
    assert _pipeline_probabilities(folder, TEXTS) == pytest.approx(expected, abs=TOLERANCE)
    # Swapped label rows would give 1 - score: the comparison can tell (the random adapter is not at 0.5).
    assert max(abs(p - 0.5) for p in expected) > 10 * TOLERANCE
    assert summary.tokenization_matches and summary.max_probe_difference <= TOLERANCE


def test_the_folder_is_plain_transformers_with_the_prompt_in_config_and_card(exported, random_adapter):
    summary, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MistralForSequenceClassification"]
    assert "auto_map" not in config  # no custom code to trust
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["problem_type"] == "single_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config["pad_token_id"] == tokenizer.pad_token_id == summary.pad_token_id
    assert tokenizer.padding_side == "right"
    metadata = read_metadata(random_adapter)
    assert config["sentiment_ray_prompt_template"] == metadata.prompt.template
    assert config["sentiment_ray"]["prompt"] == metadata.prompt.to_dict()
    assert config["sentiment_ray"]["label_token_ids"] == metadata.label_token_ids
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]  # safetensors only
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card[4:].split("\n---\n", 1)[0])
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers"
    assert "base_model" not in front  # the tiny model has no hub id
    assert "```text\nReview: {text}\nSentiment:\n```" in card and "Inputs must be formatted" in card


def test_a_calibrated_adapters_temperature_is_folded_into_the_head(random_adapter, tmp_path):
    """score = softmax(logits / T) for an adapter with a fitted temperature: the exported model gives the same."""
    calibrated = tmp_path / "calibrated"
    shutil.copytree(random_adapter, calibrated)
    metadata = read_metadata(calibrated)
    metadata.temperature = 2.0
    metadata.write(calibrated)
    summary = export_classifier(str(calibrated), str(tmp_path / "merged"))
    assert summary.temperature == 2.0
    uncalibrated = [p.score for p in predict(TEXTS, str(random_adapter), model=MODEL)]
    scores = [p.score for p in predict(TEXTS, str(calibrated), model=MODEL)]  # score and predict apply T too
    # Halving the logit difference: P' = sigmoid(logit(P) / 2).
    assert scores == pytest.approx([1 / (1 + math.exp(-math.log(p / (1 - p)) / 2)) for p in uncalibrated], abs=1e-6)
    probabilities, _ = _classifier_probabilities(tmp_path / "merged", TEXTS)
    assert probabilities == pytest.approx(scores, abs=TOLERANCE)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["sentiment_ray"][
        "temperature_folded_into_head"] == 2.0


def test_a_head_that_does_not_reproduce_the_scores_is_caught_before_writing(random_adapter, tmp_path, monkeypatch):
    """The self-check on probe prompts: a head with its rows swapped (positive first) is refused, nothing written."""
    build = export.build_classifier

    def swapped_rows(*args, **kwargs):
        classifier = build(*args, **kwargs)
        with torch.no_grad():
            classifier.score.weight.copy_(classifier.score.weight.flip(0))
        return classifier

    monkeypatch.setattr(export, "build_classifier", swapped_rows)
    with pytest.raises(export.ExportError, match=r"does not reproduce the adapter's scores \(P\(positive\) differs by"):
        export_classifier(str(random_adapter), str(tmp_path / "merged"))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_and_left_alone(random_adapter, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"already exists and is not empty \(1 entry, e\.g\. notes\.txt\); "
                                                "export never replaces a folder"):
        export_classifier(str(random_adapter), str(taken))
    assert main(["export", "--adapter", str(random_adapter), "--output", str(taken)]) == 2
    assert "sentiment-ray export: error: output" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        export_classifier(str(random_adapter), str(tmp_path / "a-file"))
    with pytest.raises(OutputExistsError, match="lies inside the adapter"):
        export_classifier(str(random_adapter), str(random_adapter / "merged"))
    # An empty folder holds nothing to keep: the CLI exports into it.
    (tmp_path / "empty").mkdir()
    assert main(["export", "--adapter", str(random_adapter), "--output", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_quantized_base_is_refused_naming_the_way_out(random_adapter, tiny_model_dir, tmp_path):
    quantized = shutil.copytree(tiny_model_dir, tmp_path / "base-4bit")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(export.ExportError, match=r"is quantized \(bitsandbytes\); .* pass --base-model"):
        export_classifier(str(random_adapter), str(tmp_path / "merged"), base_model=str(quantized))
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------ the real SmolLM2


@pytest.fixture(scope="module")
def smollm2_adapter(embedded_model, tmp_path_factory):
    """A LoRA adapter on the embedded SmolLM2 (built from PyPI's wheel, ~1 minute the first time), random with a
    non-zero B so that it changes the scores, saved as finetune saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sentiment_ray.model.backends import resolve_model_path
    from sentiment_ray.model.hub_id import known_hub_id
    from sentiment_ray.model.metadata import AdapterMetadata
    from sentiment_ray.model.names import EMBEDDED_MODEL
    from sentiment_ray.model.prompt import PromptEncoder, PromptSpec

    base_path = resolve_model_path(EMBEDDED_MODEL)
    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("smollm2") / "adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = PromptSpec(max_length=64)
    AdapterMetadata(base_model=base_path, base_model_id=known_hub_id(base_path), backend="hf", prompt=spec,
                    label_token_ids=list(PromptEncoder(spec, tokenizer).label_token_ids)).write(folder)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_export_gives_the_adapters_scores(smollm2_adapter, tmp_path):
    started = time.perf_counter()
    summary = export_classifier(str(smollm2_adapter), str(tmp_path / "merged"))
    print(f"export of SmolLM2 + adapter: {time.perf_counter() - started:.1f} s")
    assert summary.architecture == "LlamaForSequenceClassification" and summary.tokenization_matches
    assert summary.base_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    expected = [p.score for p in predict(TEXTS, str(smollm2_adapter), model=MODEL)]
    probabilities, _ = _classifier_probabilities(tmp_path / "merged", TEXTS)
    assert probabilities == pytest.approx(expected, abs=TOLERANCE)
    assert max(expected) - min(expected) > 0.05  # real, different answers, not a flat 0.5
    front = yaml.safe_load((tmp_path / "merged" / "README.md").read_text()[4:].split("\n---\n", 1)[0])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

