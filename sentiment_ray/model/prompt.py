"""The single source of truth for how a review becomes model input, shared by training and scoring.

A `PromptSpec` (template, label words, max length, truncation policy, text cleaning) is saved with every adapter
and read back by scoring, so the two can never disagree. `PromptEncoder` turns it into token ids:

    [tokenizer's leading specials] + prefix + review (clipped) + suffix  ->  label token

Each part is tokenized on its own and the review is clipped *in tokens*, so the prompt always fits `max_length`
together with its one-token completion and the sentiment cue at the end is never cut off.

Truncation policy `head_tail` (default): a review longer than its token budget keeps its first
`head_fraction` of the budget and fills the rest from its end; reviews tend to state the verdict at the end,
and Sun et al. (2019) found head+tail best for IMDB. `head` keeps only the beginning, `tail` only the end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

TEXT_SLOT = "{text}"
TRUNCATION_POLICIES = ("head_tail", "head", "tail")
_BR_TAGS = re.compile(r"<br\s*/?>", re.IGNORECASE)
_MIN_TEXT_BUDGET = 8


class PromptError(ValueError):
    """A prompt spec that cannot work with the tokenizer at hand."""


@dataclass(frozen=True)
class PromptSpec:
    template: str = "Review: {text}\nSentiment:"
    # index 0 is the negative class, index 1 the positive one; the leading space matters for BPE vocabularies
    label_words: tuple[str, str] = (" negative", " positive")
    max_length: int = 512
    truncation: str = "head_tail"
    head_fraction: float = 0.25
    clean_html_breaks: bool = True

    def __post_init__(self):
        object.__setattr__(self, "label_words", tuple(self.label_words))
        if self.template.count(TEXT_SLOT) != 1:
            raise PromptError(f"prompt.template must contain {TEXT_SLOT} exactly once, got {self.template!r}")
        if len(self.label_words) != 2 or len(set(self.label_words)) != 2 or not all(self.label_words):
            raise PromptError(f"prompt.label_words must be two different non-empty words, got {self.label_words!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise PromptError(f"prompt.truncation must be one of {TRUNCATION_POLICIES}, got {self.truncation!r}")
        if not 0.0 <= self.head_fraction <= 1.0:
            raise PromptError(f"prompt.head_fraction must be within [0, 1], got {self.head_fraction}")
        if self.max_length < _MIN_TEXT_BUDGET + 2:
            raise PromptError(f"prompt.max_length must be at least {_MIN_TEXT_BUDGET + 2}, got {self.max_length}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["label_words"] = list(self.label_words)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PromptSpec:
        return cls(**data)

    def clean(self, text: str) -> str:
        if self.clean_html_breaks:
            text = _BR_TAGS.sub(" ", text)
        return text.strip()


def clip_tokens(ids: Sequence[int], budget: int, policy: str, head_fraction: float) -> list[int]:
    """Clip a token list to `budget` tokens by the truncation policy."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    if policy == "head":
        return ids[:budget]
    if policy == "tail":
        return ids[len(ids) - budget:]
    head = int(budget * head_fraction)
    tail = budget - head
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    truncated: bool


@dataclass
class PromptEncoder:
    """A PromptSpec bound to a tokenizer: token ids for prompts, the label token ids, training examples."""

    spec: PromptSpec
    tokenizer: object
    prefix_ids: list[int] = field(init=False)
    suffix_ids: list[int] = field(init=False)
    label_token_ids: tuple[int, int] = field(init=False)
    text_budget: int = field(init=False)
    _text_lead: str = field(init=False)

    def __post_init__(self):
        prefix, suffix = self.spec.template.split(TEXT_SLOT)
        # Whitespace before the slot belongs to the review's first word ("Ġgreat" in BPE), not to the prefix.
        core = prefix.rstrip(" ")
        self._text_lead = prefix[len(core):]
        self.prefix_ids = self._leading_special_ids() + self._ids(core)
        self.suffix_ids = self._ids(suffix)
        self.label_token_ids = tuple(self._label_token_id(suffix, word) for word in self.spec.label_words)
        if self.label_token_ids[0] == self.label_token_ids[1]:
            raise PromptError(f"label words {self.spec.label_words!r} map to the same token {self.label_token_ids[0]}")
        self.text_budget = self.spec.max_length - len(self.prefix_ids) - len(self.suffix_ids) - 1
        if self.text_budget < _MIN_TEXT_BUDGET:
            raise PromptError(
                f"prompt.max_length={self.spec.max_length} leaves {self.text_budget} tokens for the review after the "
                f"template's {len(self.prefix_ids) + len(self.suffix_ids)} tokens and the label; raise max_length"
            )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _leading_special_ids(self) -> list[int]:
        """The tokens the tokenizer puts before any text (BOS for Llama/Mistral, nothing for SmolLM2)."""
        probe = "x"
        with_specials = list(self.tokenizer(probe)["input_ids"])
        plain = self._ids(probe)
        for start in range(len(with_specials) - len(plain) + 1):
            if with_specials[start:start + len(plain)] == plain:
                return with_specials[:start]
        return []

    def _label_token_id(self, suffix: str, word: str) -> int:
        # Tokenized after the suffix, as the model sees it in context, not in isolation.
        context = self._ids(suffix)
        full = self._ids(suffix + word)
        extra = full[len(context):] if full[:len(context)] == context else None
        if extra is None or len(extra) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(self._ids(word))
            raise PromptError(
                f"label word {word!r} is not a single token after the prompt with this tokenizer "
                f"(it splits into {pieces}); choose label words that are one token each, e.g. ' positive'/' negative'"
            )
        return extra[0]

    def clean_texts(self, texts: Sequence[str | None]) -> list[str]:
        return ["" if t is None else self.spec.clean(t) for t in texts]

    def encode_prompts(self, texts: Sequence[str]) -> list[EncodedPrompt]:
        """Token ids of each prompt (texts already cleaned and non-empty), in one batched tokenizer call."""
        if not texts:
            return []
        batch = self.tokenizer([self._text_lead + t for t in texts], add_special_tokens=False)["input_ids"]
        out = []
        for ids in batch:
            clipped = clip_tokens(ids, self.text_budget, self.spec.truncation, self.spec.head_fraction)
            out.append(EncodedPrompt(self.prefix_ids + clipped + self.suffix_ids, truncated=len(clipped) < len(ids)))
        return out

    def encode_example(self, prompt_ids: list[int], label: int) -> dict:
        """A TRL prompt-completion example, already tokenized: the completion is the one label token."""
        return {
            "input_ids": prompt_ids + [self.label_token_ids[label]],
            "completion_mask": [0] * len(prompt_ids) + [1],
        }
