"""`sentiment-ray export`: an adapter as a plain text-classification model, for serving without this package.

The folder it writes loads with `AutoModelForSequenceClassification.from_pretrained(folder)` and
`pipeline("text-classification", model=folder)` with no custom code, and text-classification servers (vLLM's
classify task, TEI) take it as it is. It is built so that softmax over its two logits is the adapter's `score`:

- the LoRA weights are merged into the base (peft `merge_and_unload`, in float32);
- the decoder goes unchanged into the architecture's *ForSequenceClassification model (LlamaForSequenceClassification
  for SmolLM2, MistralForSequenceClassification for Mistral and the tiny test model), with two labels in the
  project's order (0 negative, 1 positive);
- its `score` head is the LM head's rows of the two label tokens, negative first, so its logits are the two
  logits the scorer reads (times the config's `logit_scale` where the architecture has one, divided by the
  adapter's temperature where it has one);
- that head is read at the last token that is not `pad_token_id`: the config's pad id is the tokenizer's, and
  the tokenizer pads on the right, as the scorer does (left padding would move the position ids, which these
  models count from the first position whatever the mask).

What the model cannot do for its callers is the prompt: pipelines apply no template, so the template travels in
config.json (`sentiment_ray_prompt_template`) and the model card, and inputs must be formatted with it. For a
review that fits the prompt's `max_length`, the probabilities equal the scorer's (checked on probe prompts before
anything is written); longer reviews are clipped by the scorer's truncation policy and not here (model card).
"""

from __future__ import annotations

import logging
import shutil
from itertools import chain
from pathlib import Path

from sentiment_ray.export.summary import ExportSummary
from sentiment_ray.io.outputs import (
    OutputExistsError,
    check_writable,
    commit,
    refuse_overlap,
    resolve_output,
    staging_dir,
)
from sentiment_ray.io.storage import location
from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.metadata import AdapterMetadata

logger = logging.getLogger(__name__)

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
CONFIG_FILE = "config.json"
# Probability difference the self-check allows between the exported head and the merged LM's label logits: both
# are computed in float32 from the same decoder, so only float rounding separates them.
PROBE_TOLERANCE = 1e-4
# Reviews of different lengths, punctuation, digits, quotes: probes of the whole-prompt tokenization and, in one
# right-padded batch, of the head and its pooling position.
PROBE_TEXTS = (
    "Great.",
    "A wonderful, moving film: the actors were superb!",
    "Boring plot, dull ending... 2/10",
    "I didn't like it; the \"story\" was pointless and the film dragged on for 150 minutes.",
)


class ExportError(AdapterError):
    """An adapter (or base architecture) that cannot be exported as a text-classification model."""


def export_classifier(adapter: str, output: str, *, base_model: str = "", dtype: str = "float32",
                      trust_remote_code: bool = False) -> ExportSummary:
    """Write the merged text-classification model of `adapter` into the new folder `output` (module docstring).
    `base_model` overrides the base recorded in the adapter (its local path on this machine). `dtype` is that of
    the saved weights; the merge and the self-check run in float32 either way."""
    import torch

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.export.model_card import write_exported_card
    from sentiment_ray.model import backends
    from sentiment_ray.model.metadata import adapter_identity, check_adapter_loadable, local_adapter
    from sentiment_ray.model.prompt import PromptEncoder
    from sentiment_ray.model.scorer import check_label_ids

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    final = check_export_output(output, adapter)  # before the minutes of loading a model
    metadata = check_adapter_loadable(adapter, base_model, trust_remote_code)
    temperature = adapter_temperature(metadata)
    local = local_adapter(adapter)
    base = backends.resolve_model_path(base_model or metadata.base_model)
    refuse_quantized_base(base, trust_remote_code)
    model_cfg = ScoringModelConfig(name_or_path=base, backend="hf", dtype="float32", device="cpu",
                                   trust_remote_code=trust_remote_code, merge_adapter=True)
    causal_lm, tokenizer, _ = backends.load_for_scoring(model_cfg, base, str(local),
                                                        max_length=metadata.prompt.max_length)
    encoder = PromptEncoder(metadata.prompt, tokenizer)
    check_label_ids(encoder, metadata.label_token_ids)
    tokenizer.padding_side = "right"  # the scorer's padding: positions and the pooled token match it

    classifier = build_classifier(causal_lm, list(encoder.label_token_ids), list(metadata.label_names),
                                  tokenizer.pad_token_id, temperature)
    difference = check_classifier(classifier, causal_lm, encoder, tokenizer.pad_token_id, temperature)
    summary = ExportSummary(
        output=str(final), adapter=adapter_identity(adapter), architecture=type(classifier).__name__, dtype=dtype,
        base_model=base, base_model_id=metadata.base_model_id, pad_token_id=tokenizer.pad_token_id,
        temperature=temperature, tokenization_matches=whole_prompt_tokenization_matches(encoder, tokenizer),
        max_probe_difference=difference,
    )
    if not summary.tokenization_matches:
        logger.warning("tokenizing a whole formatted prompt gives other tokens than the scorer's on probe texts with "
                       "this tokenizer: the exported probabilities may differ slightly from score's (noted in the "
                       "model card)")
    record_prompt_in_config(classifier.config, metadata, summary)
    classifier.to(getattr(torch, dtype))

    staging = staging_dir(final)
    try:
        classifier.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_exported_card(staging, metadata, summary)
        commit(staging, final, overwrite=False, marker=CONFIG_FILE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def check_export_output(output: str, adapter: str) -> Path:
    """The resolved output folder, refused unless it is absent or an empty folder: export never replaces
    anything (dot-files count: a folder holding only them is not empty). Not the home folder or a filesystem
    root, not inside the adapter, and writable. A local folder only, also given as a file:// URI."""
    final = resolve_output(location(output).path if str(output).startswith("file://") else output)
    refuse_overlap(final, [adapter], "adapter")
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise OutputExistsError(f"output {final} is a file; export writes a new folder: choose another path")
        entries = sorted(e.name + ("/" if e.is_dir() else "") for e in final.iterdir())
        if entries:
            shown = ", ".join(entries[:3])
            raise OutputExistsError(f"output {final} already exists and is not empty ({len(entries)} "
                                    f"entr{'y' if len(entries) == 1 else 'ies'}, e.g. {shown}); export never "
                                    "replaces a folder: choose a new path")
    check_writable(final)
    return final


def refuse_quantized_base(base: str, trust_remote_code: bool) -> None:
    """A pre-quantized base (the reference `unsloth/mistral-7b-v0.3-bnb-4bit`) cannot take merged LoRA weights
    exactly, and a served classifier wants the unquantized weights anyway: name the way out."""
    from transformers import AutoConfig

    quantization = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code),
                           "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
        raise ExportError(f"base model {base} is quantized ({method}); export merges the adapter into unquantized "
                          "weights: pass --base-model with the model it was quantized from (a local copy or hub id)")


def adapter_temperature(metadata: AdapterMetadata) -> float | None:
    """The temperature the adapter's scores are computed with (score = softmax(logits / T)), or None: folded
    into the head, so the exported probabilities stay the adapter's (calibrated) scores."""
    temperature = metadata.temperature
    if temperature is None:
        return None
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ExportError(f"the adapter's temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def build_classifier(causal_lm, label_token_ids: list[int], label_names: list[str], pad_token_id: int,
                     temperature: float | None):
    """The architecture's *ForSequenceClassification model around `causal_lm`'s decoder (shared, not copied),
    with the label rows of its LM head as the two-class `score` head."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    text_config = causal_lm.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None):
        raise ExportError(f"{type(causal_lm).__name__} caps its logits (final_logit_softcapping), which a linear "
                          "classification head cannot reproduce")
    lm_head = causal_lm.get_output_embeddings()
    if type(lm_head) is not torch.nn.Linear:
        raise ExportError(f"unsupported LM head {type(lm_head).__name__}: expected a plain Linear layer")

    config = copy.deepcopy(causal_lm.config)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    # Softmax over the two logits, not a sigmoid per label: what pipelines apply to single-label problems.
    config.problem_type = "single_label_classification"
    # The pooled position is the last token that is not this id: the tokenizer's pad, so padding is skipped.
    config.get_text_config().pad_token_id = pad_token_id
    try:
        # On the meta device: no memory and no random init for a decoder that is replaced by the merged one.
        with torch.device("meta"):
            classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise ExportError(f"transformers has no sequence-classification model for {type(causal_lm).__name__} "
                          f"({' '.join(str(exc).split())[:200]})") from None

    decoder = causal_lm.base_model
    prefix = classifier.base_model_prefix
    head = getattr(classifier, "score", None)
    if type(getattr(classifier, prefix, None)) is not type(decoder) or not isinstance(head, torch.nn.Linear):
        raise ExportError(f"{type(classifier).__name__} is not a decoder with a linear `score` head; export "
                          "supports the causal LMs whose classifier pools the last token (Llama, Mistral, Qwen2, ...)")
    if lm_head.bias is not None and head.bias is None:
        raise ExportError(f"{type(causal_lm).__name__}'s LM head has a bias that {type(classifier).__name__}'s "
                          "head cannot hold")
    setattr(classifier, prefix, decoder)

    ids = torch.tensor(label_token_ids, device=lm_head.weight.device)
    # The scorer's logits are (hidden @ label rows) * logit_scale; a temperature divides them before the softmax.
    scale = (getattr(text_config, "logit_scale", None) or 1.0) / (temperature or 1.0)
    score = torch.nn.Linear(head.in_features, len(label_token_ids), bias=head.bias is not None,
                            dtype=lm_head.weight.dtype, device=lm_head.weight.device)
    with torch.no_grad():
        score.weight.copy_(lm_head.weight[ids] * scale)  # a copy: the rows of a tied embedding are not shared
        if score.bias is not None:
            score.bias.copy_(lm_head.bias[ids] * scale)
    classifier.score = score

    on_meta = [name for name, tensor in chain(classifier.named_parameters(), classifier.named_buffers())
               if tensor.is_meta]
    if on_meta:
        raise ExportError(f"{type(classifier).__name__} has weights beyond the decoder and the head "
                          f"({', '.join(on_meta[:3])}); export cannot fill them")
    return classifier.eval()


def check_classifier(classifier, causal_lm, encoder, pad_token_id: int, temperature: float | None) -> float:
    """The largest |P(positive)| difference between the classifier and the merged causal LM's label logits on
    the probe prompts in one right-padded batch; ExportError above PROBE_TOLERANCE. It proves the head's rows,
    its order, the scale and the pooled position on this very model before anything is written."""
    import torch

    prompts = [p.input_ids for p in encoder.encode_prompts(encoder.clean_texts(list(PROBE_TEXTS)))]
    width = max(map(len, prompts))
    input_ids = torch.tensor([p + [pad_token_id] * (width - len(p)) for p in prompts])
    attention_mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    last = torch.tensor([len(p) - 1 for p in prompts])
    with torch.inference_mode():
        logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask).logits
        reference = logits[torch.arange(len(prompts)), last][:, list(encoder.label_token_ids)].float()
        reference = torch.softmax(reference / (temperature or 1.0), dim=-1)[:, 1]
        exported = torch.softmax(classifier(input_ids=input_ids, attention_mask=attention_mask).logits.float(),
                                 dim=-1)[:, 1]
    difference = float((exported - reference).abs().max())
    if not difference <= PROBE_TOLERANCE:
        raise ExportError(f"the exported {type(classifier).__name__} does not reproduce the adapter's scores "
                          f"(P(positive) differs by {difference:.2e} on probe prompts); nothing was written")
    return difference


def whole_prompt_tokenization_matches(encoder, tokenizer) -> bool:
    """Whether tokenizing the formatted prompt in one call (what a pipeline does) gives the tokens the scorer
    builds from the template's parts and the review, on the probe texts that fit the budget."""
    template = encoder.spec.template
    texts = encoder.clean_texts(list(PROBE_TEXTS))
    for text, prompt in zip(texts, encoder.encode_prompts(texts)):
        if not prompt.truncated and tokenizer(template.replace("{text}", text))["input_ids"] != prompt.input_ids:
            return False
    return True


def record_prompt_in_config(config, metadata: AdapterMetadata, summary: ExportSummary) -> None:
    """What a caller needs to format inputs, and where the model came from, in config.json itself."""
    config.sentiment_ray_prompt_template = metadata.prompt.template
    config.sentiment_ray = {
        "prompt": metadata.prompt.to_dict(),
        "label_words": list(metadata.prompt.label_words),
        "label_token_ids": list(metadata.label_token_ids),
        "threshold": metadata.threshold,
        "temperature_folded_into_head": summary.temperature,
        "adapter": summary.adapter,
        "base_model": metadata.base_model,
        "base_model_id": metadata.base_model_id,
        "data_fingerprint": metadata.data.get("fingerprint"),
        "tokenization_matches_scorer": summary.tokenization_matches,
        "package_version": summary.package_version,
    }
