"""What `export` wrote and checked: returned to the CLI and recorded in the exported folder's model card."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sentiment_ray import __version__


@dataclass(frozen=True)
class ExportSummary:
    output: str
    adapter: str  # `<folder name>@<sha256 of the weights, 12 hex>`
    architecture: str  # e.g. LlamaForSequenceClassification
    dtype: str
    base_model: str  # where the base was loaded from
    base_model_id: str | None
    pad_token_id: int
    temperature: float | None  # folded into the head (None: the adapter has none)
    tokenization_matches: bool  # tokenizing the whole formatted prompt gives the scorer's tokens (probe texts)
    max_probe_difference: float  # the self-check's largest |P(positive) difference| on the probe prompts
    package_version: str = __version__

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
