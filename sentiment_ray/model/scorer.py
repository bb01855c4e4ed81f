"""Scoring a batch of reviews: one forward pass, the last real position only, two label logits.

P(positive) = softmax(logit[negative word], logit[positive word])[1] at the position after the sentiment cue.
No `generate()`: the label words are single tokens, so their two logits answer the question exactly. The batch
is right-padded and each row's last real position is gathered, so the positions the model sees are the same as
for that row alone; only the hidden state of that position meets the LM head, and only the two label rows of it.
With `forward: packed` / `compiled_packed` the rows are packed end to end instead, no pad tokens at all
(packed_forward.py).

What counts as text (every other value is a marked row, never an exception that loses the batch):
- a `str` that encodes to UTF-8. A str holding lone surrogates (what invalid bytes become under Python's
  `surrogateescape`, e.g. in argv) is marked `invalid_utf8`, with the offending byte or character in `error`;
- `bytes` that decode as UTF-8 (else `invalid_utf8`, naming the byte offset). So a Parquet text column of binary
  type (`binary`, `large_binary`) is scored like a string column: valid UTF-8 scored, the rest marked; and a
  string column is read without pyarrow's UTF-8 validation (`data.text_values`), so one bad cell costs only its row;
- null, empty or whitespace-only text is `empty_text`; anything else (numbers, ...) is `non_string_text`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sentiment_ray.config import (
    BUDGETED_FORWARDS,
    COMPILED_FORWARDS,
    FORWARD_MODES,
    GRAPHED_FORWARDS,
    NO_QUANTIZATION,
    PACKED_FORWARDS,
    SHAPED_FORWARDS,
    ForwardUnavailable,
    ModelConfig,
)
from sentiment_ray.io.inputs import utf8_problem
from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.forwards.graphed import causal_decoder_hidden
from sentiment_ray.model.forwards.shapes import ShapeBuckets
from sentiment_ray.model.labels import CLASS_NAMES
from sentiment_ray.model.metadata import adapter_identity, check_adapter_loadable, check_base_model, read_metadata
from sentiment_ray.model.names import EMBEDDED_MODEL
from sentiment_ray.model.prompt import PromptEncoder, PromptSpec

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_EMPTY = "empty_text"  # null, empty or whitespace-only text (after cleaning): no score, row kept
STATUS_NON_STRING = "non_string_text"  # a number, a list, ... in the text column: no score, row kept
STATUS_NO_TOKENS = "no_tokens"  # text the tokenizer turns into no tokens at all: no score, row kept
STATUS_ERROR = "error"  # scoring raised, also when retried alone: no score, the exception in `error`
STATUS_INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8 (or a str with lone surrogates): where, in `error`
ROW_STATUSES = (STATUS_OK, STATUS_EMPTY, STATUS_NON_STRING, STATUS_NO_TOKENS, STATUS_ERROR, STATUS_INVALID_UTF8)
# Tokenizing is linear in the text, and a multi-megabyte "review" would stall a batch for nothing: text beyond
# this many characters per budget token can never survive truncation (tokens are far shorter), so it is cut
# before tokenizing, on the side the truncation policy drops.
CHARS_PER_TOKEN_BOUND = 64
ERROR_MESSAGE_CHARS = 500


@dataclass
class BatchScores:
    scores: list[float | None]  # P(positive); None where status != ok
    statuses: list[str]
    truncated: list[bool]
    errors: list[str | None] | None = None  # the exception of rows with status error

    def __post_init__(self):
        if self.errors is None:
            self.errors = [None] * len(self.scores)

    @classmethod
    def concat(cls, parts: list[BatchScores]) -> BatchScores:
        return cls([s for p in parts for s in p.scores], [s for p in parts for s in p.statuses],
                   [t for p in parts for t in p.truncated], [e for p in parts for e in p.errors])

    def labels(self, threshold: float = 0.5) -> list[str | None]:
        """The label of each scored row: positive when its score >= threshold."""
        return [None if s is None else CLASS_NAMES[int(s >= threshold)] for s in self.scores]


def as_text(value) -> tuple[str | None, str | None, str | None]:
    """(text, status, error) for one cell: the text to score, or None with the status that marks the row
    (status None with text None: a null, which is empty_text)."""
    if value is None:
        return None, None, None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, STATUS_INVALID_UTF8, f"invalid UTF-8 byte 0x{value[exc.start]:02x} at byte {exc.start}"
    if not isinstance(value, str):
        return None, STATUS_NON_STRING, None
    problem = utf8_problem(value)
    return (None, STATUS_INVALID_UTF8, problem) if problem else (value, None, None)


@dataclass
class PreparedTexts:
    """Texts turned into prompt token ids by the adapter's prompt spec, or marked: the CPU half of scoring."""

    input_ids: list[list[int] | None]  # None where the row is marked
    statuses: list[str | None]  # None: to be scored; else the status that marks the row
    truncated: list[bool]
    errors: list[str | None]


def check_label_ids(encoder: PromptEncoder, expected_label_ids: list[int] | None) -> None:
    if expected_label_ids is not None and list(encoder.label_token_ids) != list(expected_label_ids):
        raise AdapterError(
            f"the tokenizer maps the label words {encoder.spec.label_words} to {list(encoder.label_token_ids)}, but "
            f"the adapter was trained with {expected_label_ids}: the base model's tokenizer differs from training's"
        )


class TextPreparer:
    """Clean, clip and tokenize texts by a prompt spec, marking the rows that cannot be scored. It needs only the
    tokenizer, so the scoring pipeline runs it in CPU actors and the GPU actor gets token ids."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder

    @classmethod
    def load(cls, adapter: str | None, weights_sha256: str | None, model: ModelConfig,
             prompt: PromptSpec) -> TextPreparer:
        """The tokenizer the scorer of the same adapter (or zero-shot base) uses, with its prompt spec."""
        from sentiment_ray.model import backends

        if adapter:
            from sentiment_ray.model.metadata import local_adapter

            metadata = read_metadata(local_adapter(adapter, weights_sha256))
            base, prompt, expected = (model.name_or_path or metadata.base_model, metadata.prompt,
                                      metadata.label_token_ids)
        else:
            base, expected = model.name_or_path or EMBEDDED_MODEL, None
        tokenizer = backends.load_tokenizer(model, backends.resolve_model_path(base))
        encoder = PromptEncoder(prompt, tokenizer)
        check_label_ids(encoder, expected)
        return cls(encoder)

    def _clip_chars(self, text: str) -> str:
        """Drop characters that cannot survive token truncation, on the side the policy drops (see
        CHARS_PER_TOKEN_BOUND); the tokens kept are the same as without this cut."""
        spec = self.encoder.spec
        limit = (self.encoder.text_budget + 1) * CHARS_PER_TOKEN_BOUND
        if len(text) <= limit:
            return text
        if spec.truncation == "head":
            return text[:limit]
        if spec.truncation == "tail":
            return text[-limit:]
        head = int(self.encoder.text_budget * spec.head_fraction + 1) * CHARS_PER_TOKEN_BOUND
        return text[:head] + text[-(limit - head):] if limit > head else text[:head]

    def prepare(self, texts: list) -> PreparedTexts:
        """Token ids and a status per row; rows that cannot be scored are marked, never dropped (module docstring)."""
        input_ids: list[list[int] | None] = [None] * len(texts)
        statuses: list[str | None] = [STATUS_EMPTY] * len(texts)
        truncated = [False] * len(texts)
        errors: list[str | None] = [None] * len(texts)
        decoded: dict[int, str] = {}
        cleaned: dict[int, str] = {}
        for i, value in enumerate(texts):
            text, status, error = as_text(value)
            if status is not None:
                statuses[i], errors[i] = status, error
            elif text is not None and (clean := self.encoder.spec.clean(self._clip_chars(text))):
                decoded[i], cleaned[i] = text, clean
        template_tokens = len(self.encoder.prefix_ids) + len(self.encoder.suffix_ids)
        for i, prompt in zip(cleaned, self.encoder.encode_prompts(list(cleaned.values()))):
            if len(prompt.input_ids) == template_tokens:  # the review itself contributed nothing
                statuses[i] = STATUS_NO_TOKENS
                continue
            input_ids[i], statuses[i] = prompt.input_ids, None
            truncated[i] = prompt.truncated or len(decoded[i]) > len(self._clip_chars(decoded[i]))
        return PreparedTexts(input_ids, statuses, truncated, errors)


class SentimentScorer:
    def __init__(self, model, tokenizer, prompt: PromptSpec, identity: str, expected_label_ids: list[int] | None = None,
                 max_batch_tokens: int | None = None, forward: str = "eager", temperature: float = 1.0,
                 threshold: float = 0.5, quantization: str = NO_QUANTIZATION):
        import torch

        # ScoringModelConfig.quantization, as applied here: "none", "fp8_rowwise", or "none (fp8 unavailable: why)"
        # after one warning line (fp8.py). Before the forwards are set up: the compiled layers trace the fp8 linears.
        self.quantization = NO_QUANTIZATION
        if quantization != NO_QUANTIZATION:
            from sentiment_ray.model.fp8 import quantize_for_scoring

            model, self.quantization = quantize_for_scoring(model, quantization)
        self.model = model
        # None: the whole batch in one forward pass. A number: rows sorted by length and cut into forwards of at
        # most this many padded tokens, so a long review no longer pads every short one in its batch.
        self.max_batch_tokens = max_batch_tokens
        self.encoder = PromptEncoder(prompt, tokenizer)
        check_label_ids(self.encoder, expected_label_ids)
        self.preparer = TextPreparer(self.encoder)
        self.identity = identity
        # P(positive) = softmax(logits / temperature): the temperature fitted on held-out training rows
        # (calibration.py) and stored with the adapter, so score, predict and export give the same probability.
        self.temperature = temperature
        self.threshold = threshold
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
        self._graphs = None
        self._compiled = None
        self._replaced_attention = None  # the decoder's attention implementation while packed forwards replace it
        self.requested_forward = forward
        try:
            self.use_forward(forward)
        except ForwardUnavailable as exc:  # the configs name the fastest forward; where it cannot run, eager does
            logger.warning("forward=%s cannot run here (%s); scoring with the eager forward", forward, exc)
            self.use_forward("eager")

    def use_forward(self, forward: str, buckets: ShapeBuckets | None = None) -> None:
        """How forwards run from now on (ScoreConfig.forward); in place, so that one loaded model can serve
        several modes (benchmarks/gpu_forward.py). `buckets`: other shape steps than ShapeBuckets' defaults."""
        if forward not in FORWARD_MODES:
            raise ValueError(f"forward must be one of {list(FORWARD_MODES)}, got {forward!r}")
        if forward in BUDGETED_FORWARDS and not self.max_batch_tokens:
            raise ValueError(f"forward={forward} needs max_batch_tokens: its forwards are cut from the token budget")
        if forward in GRAPHED_FORWARDS and self.device.type != "cuda":
            raise ForwardUnavailable(f"forward={forward} needs the model on a CUDA device; it is on {self.device}")
        if forward in GRAPHED_FORWARDS + PACKED_FORWARDS:
            from sentiment_ray.model.forwards.graphed import check_plain_causal_decoder

            check_plain_causal_decoder(self._decoder, self.encoder.spec.max_length, forward)
        if forward in PACKED_FORWARDS:
            from sentiment_ray.model.forwards.packed import check_packable

            check_packable(self._decoder, forward)
        if self._compiled is not None:
            self._compiled.uncompile()
            self._compiled = None
        self._set_packed_attention(forward in PACKED_FORWARDS)
        self.forward_mode = forward
        self.buckets = (buckets or ShapeBuckets(self.max_batch_tokens)) if forward in SHAPED_FORWARDS else None
        if forward in COMPILED_FORWARDS:
            from sentiment_ray.model.forwards.compiled import CompiledDecoderLayers

            self._compiled = CompiledDecoderLayers(self._decoder)
        self._graphs = None
        if forward in GRAPHED_FORWARDS:
            from sentiment_ray.model.forwards.graphed import CudaGraphForward

            # compiled_graphs: the compiled layers' kernels captured per shape, so that a replay launches none
            # of them from Python (the compiled forward alone was bound by its launching thread, BENCHMARKS §14).
            self._graphs = CudaGraphForward(self._run_logits, self.device, self._compile_seconds)
        self.warm_up()

    def _set_packed_attention(self, packed: bool) -> None:
        from sentiment_ray.model.forwards import packed as packed_forward

        if packed and self._replaced_attention is None:
            self._replaced_attention = packed_forward.install_packed_attention(self._decoder)
        elif not packed and self._replaced_attention is not None:
            packed_forward.restore_attention(self._decoder, self._replaced_attention)
            self._replaced_attention = None

    def warm_up(self) -> None:
        """Compile now what the first batch would compile (compiled forwards), with two dummy prompts: the scoring
        actor does it as it loads, while the read and tokenizing stages start, so the compile no longer holds its
        first batch up (and on a machine that has run the same model, it loads from the compile cache:
        compile_cache.py). CUDA graphs are still captured per shape as the shapes occur."""
        if self._compiled is None:
            return
        # Two prompts, then one: torch specializes a size of 1, and a batch's last forward or pack may hold a
        # single prompt. Graphed forwards pad to fixed row counts, never one.
        for prompts in ([[self.pad_id] * 24, [self.pad_id] * 40], [[self.pad_id] * 24]):
            if self.forward_mode in PACKED_FORWARDS:
                self._packed_logits(prompts)
            elif self.buckets is not None:
                self._run_logits(*self._padded(prompts, width=64, rows=self.buckets.row_step))
                return
            else:
                self._run_logits(*self._padded(prompts))

    @property
    def compile_cache(self):
        """CompileCacheCounts of the compiled layers (None when nothing is compiled)."""
        return self._compiled.cache_counts if self._compiled is not None else None

    @property
    def capture_seconds(self) -> float:
        """Seconds spent capturing CUDA graphs or compiling so far (0 with forward eager or static_shapes)."""
        captures = self._graphs.capture_seconds if self._graphs else 0.0
        return captures + self._compile_seconds()

    def _compile_seconds(self) -> float:
        return self._compiled.compile_seconds if self._compiled else 0.0

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, model: ModelConfig | None = None,
                     max_batch_tokens: int | None = None, weights_sha256: str | None = None,
                     forward: str = "eager") -> SentimentScorer:
        """Base model + adapter (a local folder or a URI, copied once per node into a cache keyed by
        `weights_sha256`); `model.name_or_path` overrides the recorded base (e.g. its path on this node)."""
        from sentiment_ray.model import backends
        from sentiment_ray.model.metadata import local_adapter

        identity = adapter_identity(adapter_dir, weights_sha256)  # the given folder's name, not the cache's
        local = local_adapter(adapter_dir, weights_sha256)
        metadata = read_metadata(local)
        model = model or ModelConfig(name_or_path="")
        base = backends.resolve_model_path(model.name_or_path or metadata.base_model)
        loaded, tokenizer, _ = backends.load_for_scoring(model, base, str(local), max_length=metadata.prompt.max_length)
        return cls(loaded, tokenizer, metadata.prompt, identity, metadata.label_token_ids,
                   max_batch_tokens=max_batch_tokens, forward=forward, temperature=metadata.temperature or 1.0,
                   threshold=0.5 if metadata.threshold is None else metadata.threshold,
                   quantization=getattr(model, "quantization", NO_QUANTIZATION))

    @classmethod
    def zero_shot(cls, model: ModelConfig, prompt: PromptSpec, max_batch_tokens: int | None = None,
                  forward: str = "eager") -> SentimentScorer:
        """The base model alone, with the same prompt and label words: the before-finetuning baseline."""
        from sentiment_ray.model import backends

        base = backends.resolve_model_path(model.name_or_path or EMBEDDED_MODEL)
        loaded, tokenizer, _ = backends.load_for_scoring(model, base, None, max_length=prompt.max_length)
        return cls(loaded, tokenizer, prompt, f"zero-shot:{Path(base).name}", max_batch_tokens=max_batch_tokens,
                   forward=forward, quantization=getattr(model, "quantization", NO_QUANTIZATION))

    @classmethod
    def load(cls, adapter_dir: str | None, model: ModelConfig, prompt: PromptSpec,
             max_batch_tokens: int | None = None, weights_sha256: str | None = None,
             forward: str = "eager") -> SentimentScorer:
        if adapter_dir:
            return cls.from_adapter(adapter_dir, model, max_batch_tokens, weights_sha256, forward)
        return cls.zero_shot(model, prompt, max_batch_tokens, forward)

    # ---------------------------------------------------------------------------------- scoring

    def _padded(self, prompts: list[list[int]], width: int | None = None, rows: int | None = None):
        """(input_ids [rows, width], last real position per row) on the model's device: right-padded, dummy rows
        (all pad, last position 0) up to `rows`."""
        import torch

        # Padded with numpy in one vectorized step, not row by row: at thousands of rows/s on a GPU the host work
        # of building the batch would otherwise keep the GPU waiting.
        row_lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        width = width or int(row_lengths.max())
        rows = rows or len(prompts)
        real = np.arange(width)[None, :] < row_lengths[:, None]
        padded = np.full((rows, width), self.pad_id, dtype=np.int64)
        padded[:len(prompts)][real] = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
        last = np.zeros(rows, dtype=np.int64)
        last[:len(prompts)] = row_lengths - 1
        return (torch.from_numpy(padded).to(self.device, non_blocking=True),
                torch.from_numpy(last).to(self.device, non_blocking=True))

    def _logits_of(self, input_ids, last_positions):
        """[rows, 2] float32 logits of (negative, positive) at each row's last real position."""
        import torch

        with torch.inference_mode():
            # No attention mask, and the result is the same: the pads sit after each row's last real token, and
            # causal attention already keeps a position from seeing anything after it. Without a mask the model
            # builds no [batch, 1, width, width] mask per forward and SDPA takes its causal kernel (1.32x on
            # SmolLM2 on an H200, docs/BENCHMARKS.md §8).
            if self._graphs is not None:  # the same steps, but no mask built inside a capture
                hidden = causal_decoder_hidden(self._decoder, input_ids)
            else:
                hidden = self._decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            return self._label_logits(hidden[torch.arange(input_ids.shape[0], device=input_ids.device),
                                             last_positions])

    def _packed_logits_of(self, batch):
        """[prompts, 2] logits of a packed forward (packed_forward.py) at each prompt's last token."""
        import torch

        from sentiment_ray.model.forwards.packed import packed_last_hidden

        with torch.inference_mode():
            return self._label_logits(packed_last_hidden(self._decoder, batch))

    def _label_logits(self, last_hidden):
        """[rows, 2] float32 logits of (negative, positive) from the final hidden states of the last positions."""
        import torch

        logits = last_hidden.to(self._label_weight.dtype) @ self._label_weight.t()
        if self._label_bias is not None:
            logits = logits + self._label_bias
        logits = logits.float() * self._logit_scale
        if self._softcap is not None:
            logits = self._softcap * torch.tanh(logits / self._softcap)
        return logits

    def forward_groups(self, lengths: list[int]) -> list[list[int]]:
        """Row indices per eager forward pass: all rows at once, or length-sorted groups within the token budget."""
        if not self.max_batch_tokens:
            return [list(range(len(lengths)))]
        groups, current = [], []
        for row in sorted(range(len(lengths)), key=lengths.__getitem__):
            if current and (len(current) + 1) * lengths[row] > self.max_batch_tokens:
                groups.append(current)
                current = []
            current.append(row)
        return groups + [current] if current else groups

    def _forward_logits(self, prompts: list[list[int]], width: int | None, rows: int | None):
        """[len(prompts), 2] logits of one forward pass, padded to `width` x `rows` (None: as the prompts need)."""
        input_ids, last = self._padded(prompts, width, rows)
        if self._graphs is not None:
            try:
                return self._graphs(input_ids, last)[:len(prompts)]
            except RuntimeError as exc:  # a model whose forward syncs with the host cannot be captured
                self._graphs = None
                self.forward_mode = "compiled" if self._compiled is not None else "static_shapes"
                logger.warning("CUDA graph capture failed (%s: %s); scoring with static shapes, uncaptured%s",
                               type(exc).__name__, str(exc)[:300],
                               ", through the compiled layers" if self._compiled is not None else "")
        return self._run_logits(input_ids, last)[:len(prompts)]

    def _through_layers(self, forward: Callable, *args):
        """`forward(*args)`, through the compiled layers' bookkeeping while they are compiled."""
        if self._compiled is not None and self._compiled.active:
            return self._compiled.run(forward, *args)
        return forward(*args)

    def _run_logits(self, input_ids, last_positions):
        return self._through_layers(self._logits_of, input_ids, last_positions)

    def _packed_logits(self, prompts: list[list[int]]):
        from sentiment_ray.model.forwards.packed import packed_batch

        # The prompt budget as the kernel's bound: every prompt fits it, and one value serves every pack.
        return self._through_layers(self._packed_logits_of,
                                    packed_batch(prompts, self.device, max_length=self.encoder.spec.max_length))

    def _margins(self, prompts: list[list[int]]):
        """(logit(positive) - logit(negative) per prompt as a device tensor, prompt order of the tensor's rows)."""
        import torch

        lengths = [len(p) for p in prompts]
        if self.forward_mode in PACKED_FORWARDS:
            from sentiment_ray.model.forwards.packed import pack_rows

            packs = pack_rows(lengths, self.max_batch_tokens)
            logits = torch.cat([self._packed_logits([prompts[j] for j in rows]) for rows in packs])
            return logits[:, 1] - logits[:, 0], [j for rows in packs for j in rows]
        if self.buckets is not None:
            forwards = [(f.rows, f.width, f.padded_rows) for f in self.buckets.plan(lengths)]
        else:
            forwards = [(group, None, None) for group in self.forward_groups(lengths)]
        order = [j for rows, _, _ in forwards for j in rows]
        logits = torch.cat([self._forward_logits([prompts[j] for j in rows], width, padded)
                            for rows, width, padded in forwards])
        return logits[:, 1] - logits[:, 0], order

    def _in_prompt_order(self, values, order: list[int]) -> list[float]:
        # Every forward of the batch is queued before this one copy back to the host: a copy per forward would
        # make the GPU wait while the host pads the next group.
        host = values.cpu().numpy().astype(np.float64)
        out: list[float] = [0.0] * len(order)
        for j, value in zip(order, host):
            out[j] = float(value)
        return out

    def score_token_ids(self, prompts: list[list[int]]) -> list[float]:
        """P(positive) of each tokenized prompt, in length-sorted forwards within `max_batch_tokens`:
        softmax over the two label logits = sigmoid of their difference, over the adapter's temperature."""
        import torch

        if not prompts:
            return []
        margins, order = self._margins(prompts)
        return self._in_prompt_order(torch.sigmoid(margins / self.temperature), order)

    def logit_margins(self, texts: list) -> list[float | None]:
        """logit(positive) - logit(negative) of each text before any temperature (None where a row is marked):
        what temperature scaling is fitted on."""
        prepared = self.preparer.prepare(texts)
        rows = [i for i, status in enumerate(prepared.statuses) if status is None]
        out: list[float | None] = [None] * len(texts)
        if rows:
            margins, order = self._margins([prepared.input_ids[i] for i in rows])
            for i, margin in zip(rows, self._in_prompt_order(margins, order)):
                out[i] = margin
        return out

    def score_prepared(self, prepared: PreparedTexts) -> BatchScores:
        rows = [i for i, status in enumerate(prepared.statuses) if status is None]
        scores: list[float | None] = [None] * len(prepared.statuses)
        statuses = list(prepared.statuses)
        for i, score in zip(rows, self.score_token_ids([prepared.input_ids[i] for i in rows])):
            scores[i], statuses[i] = score, STATUS_OK
        return BatchScores(scores, statuses, list(prepared.truncated), list(prepared.errors))

    def score_texts(self, texts: list) -> BatchScores:
        """Scores and a status per row; rows that cannot be scored are marked, never dropped (module docstring)."""
        return self.score_prepared(self.preparer.prepare(texts))


def check_loadable(adapter_dir: str | Path | None, model: ModelConfig) -> None:
    """On the driver, before any work: what `SentimentScorer.load` will need is there and readable (the adapter's
    weights and its base model; zero-shot: the base model), so a bad one is one line, not a traceback per actor."""
    if adapter_dir:
        check_adapter_loadable(adapter_dir, model.name_or_path, model.trust_remote_code)
    else:
        check_base_model(model.name_or_path or EMBEDDED_MODEL, model.trust_remote_code)


def score_with_retry(score: Callable[[list], BatchScores], texts: list,
                     on_retry: Callable[[str], None] = print) -> BatchScores:
    """`score(texts)`, retried once as a whole (a transient failure), then row by row so that only the rows
    that still raise are lost to scoring: they come back with status `error` and the exception, never dropped."""
    try:
        return score(texts)
    except Exception as first:  # noqa: BLE001 - any failure of one batch must not end a job of millions of rows
        on_retry(f"[score] batch of {len(texts)} rows failed ({type(first).__name__}: {first}); retrying it")
    try:
        return score(texts)
    except Exception as second:  # noqa: BLE001
        on_retry(f"[score] batch failed again ({type(second).__name__}: {second}); scoring its rows one by one")
    rows = []
    for text in texts:
        try:
            rows.append(score([text]))
        except Exception as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}"[:ERROR_MESSAGE_CHARS]
            rows.append(BatchScores([None], [STATUS_ERROR], [False], [message]))
    return BatchScores.concat(rows)
