"""Scoring a batch of reviews: one forward pass, the last real position only, two label logits.

P(positive) = softmax(logit[negative word], logit[positive word])[1] at the position after the sentiment cue.
No `generate()`: the label words are single tokens, so their two logits answer the question exactly. The batch
is right-padded and each row's last real position is gathered, so the positions the model sees are the same as
for that row alone; only the hidden state of that position meets the LM head, and only the two label rows of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sentiment_ray.config import EMBEDDED_MODEL, ModelConfig
from sentiment_ray.labels import CLASS_NAMES
from sentiment_ray.metadata import AdapterError, adapter_identity, read_metadata
from sentiment_ray.prompt import PromptEncoder, PromptSpec

STATUS_OK = "ok"
STATUS_EMPTY = "empty_text"  # null, empty or whitespace-only text (after cleaning): no score, row kept


@dataclass
class BatchScores:
    scores: list[float | None]  # P(positive); None where status != ok
    statuses: list[str]
    truncated: list[bool]

    @property
    def label_ids(self) -> list[int | None]:
        return [None if s is None else int(s >= 0.5) for s in self.scores]

    @property
    def labels(self) -> list[str | None]:
        return [None if i is None else CLASS_NAMES[i] for i in self.label_ids]


class SentimentScorer:
    def __init__(self, model, tokenizer, prompt: PromptSpec, identity: str, expected_label_ids: list[int] | None = None,
                 max_batch_tokens: int | None = None):
        import torch

        self.model = model
        # None: the whole batch in one forward pass. A number: rows sorted by length and cut into forwards of at
        # most this many padded tokens, so a long review no longer pads every short one in its batch.
        self.max_batch_tokens = max_batch_tokens
        self.encoder = PromptEncoder(prompt, tokenizer)
        if expected_label_ids is not None and list(self.encoder.label_token_ids) != list(expected_label_ids):
            raise AdapterError(
                f"the tokenizer maps the label words {prompt.label_words} to {list(self.encoder.label_token_ids)}, but "
                f"the adapter was trained with {expected_label_ids}: the base model's tokenizer differs from training's"
            )
        self.identity = identity
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = causal_lm.get_decoder()  # LoRA layers sit inside it, so calling it applies the adapter
        lm_head = causal_lm.get_output_embeddings()
        if type(lm_head) is not torch.nn.Linear:
            raise AdapterError(f"unsupported LM head {type(lm_head).__name__}: expected a plain Linear layer")
        ids = torch.tensor(self.encoder.label_token_ids, device=lm_head.weight.device)
        self._label_weight = lm_head.weight.detach()[ids]  # [2, hidden]: the only rows of the head we need
        self._label_bias = None if lm_head.bias is None else lm_head.bias.detach()[ids]
        text_config = causal_lm.config.get_text_config()
        self._logit_scale = getattr(text_config, "logit_scale", None) or 1.0
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        self.device = self._label_weight.device

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, model: ModelConfig | None = None,
                     max_batch_tokens: int | None = None) -> SentimentScorer:
        """Base model + adapter; `model.name_or_path` overrides the recorded base (e.g. its path on this node)."""
        from sentiment_ray import backends

        adapter_dir = Path(adapter_dir).expanduser().resolve()
        metadata = read_metadata(adapter_dir)
        model = model or ModelConfig(name_or_path="")
        base = backends.resolve_model_path(model.name_or_path or metadata.base_model)
        loaded, tokenizer, _ = backends.load_for_scoring(
            model, base, str(adapter_dir), max_length=metadata.prompt.max_length
        )
        return cls(loaded, tokenizer, metadata.prompt, adapter_identity(adapter_dir), metadata.label_token_ids,
                   max_batch_tokens=max_batch_tokens)

    @classmethod
    def zero_shot(cls, model: ModelConfig, prompt: PromptSpec, max_batch_tokens: int | None = None) -> SentimentScorer:
        """The base model alone, with the same prompt and label words: the before-finetuning baseline."""
        from sentiment_ray import backends

        base = backends.resolve_model_path(model.name_or_path or EMBEDDED_MODEL)
        loaded, tokenizer, _ = backends.load_for_scoring(model, base, None, max_length=prompt.max_length)
        return cls(loaded, tokenizer, prompt, f"zero-shot:{Path(base).name}", max_batch_tokens=max_batch_tokens)

    @classmethod
    def load(cls, adapter_dir: str | None, model: ModelConfig, prompt: PromptSpec,
             max_batch_tokens: int | None = None) -> SentimentScorer:
        if adapter_dir:
            return cls.from_adapter(adapter_dir, model, max_batch_tokens)
        return cls.zero_shot(model, prompt, max_batch_tokens)

    # ---------------------------------------------------------------------------------- scoring

    def label_logits(self, prompts: list[list[int]]):
        """[batch, 2] float32 logits of (negative, positive) at each prompt's last position; one forward pass."""
        import torch

        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
        with torch.inference_mode():
            hidden = self._decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
            logits = last.to(self._label_weight.dtype) @ self._label_weight.t()
            if self._label_bias is not None:
                logits = logits + self._label_bias
            logits = logits.float() * self._logit_scale
            if self._softcap is not None:
                logits = self._softcap * torch.tanh(logits / self._softcap)
        return logits

    def forward_groups(self, lengths: list[int]) -> list[list[int]]:
        """Row indices per forward pass: all rows at once, or length-sorted groups within the token budget."""
        if not self.max_batch_tokens:
            return [list(range(len(lengths)))]
        groups, current = [], []
        for row in sorted(range(len(lengths)), key=lengths.__getitem__):
            if current and (len(current) + 1) * lengths[row] > self.max_batch_tokens:
                groups.append(current)
                current = []
            current.append(row)
        return groups + [current] if current else groups

    def score_texts(self, texts: list[str | None]) -> BatchScores:
        import torch

        cleaned = self.encoder.clean_texts(texts)
        scorable = [i for i, t in enumerate(cleaned) if t]
        scores: list[float | None] = [None] * len(texts)
        statuses = [STATUS_EMPTY] * len(texts)
        truncated = [False] * len(texts)
        if scorable:
            encoded = self.encoder.encode_prompts([cleaned[i] for i in scorable])
            for group in self.forward_groups([len(e.input_ids) for e in encoded]):
                logits = self.label_logits([encoded[j].input_ids for j in group])
                positive = torch.softmax(logits, dim=-1)[:, 1].cpu().numpy().astype(np.float64)
                for j, p in zip(group, positive):
                    i = scorable[j]
                    scores[i] = float(p)
                    statuses[i] = STATUS_OK
                    truncated[i] = encoded[j].truncated
        return BatchScores(scores, statuses, truncated)

