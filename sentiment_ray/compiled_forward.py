"""The scoring forward under `torch.compile`: fused kernels, one graph per padded width.

The eager forward of a small model is bound by launches of small elementwise kernels (RMSNorm, RoPE, SiLU x mul:
~37 % of the 7B scorer's GPU time, and most of SmolLM2's); inductor fuses them. What made compiling lose inside
the job before (docs/BENCHMARKS.md §8) was shapes: every batch brought new ones, and a dynamic graph ran slower.
Here the rows come cut into `forward_shapes.ShapeBuckets` (widths in steps of 64 tokens), the width is kept
static and the row count is marked dynamic, so an actor compiles once per width (at most max_length / 64
graphs) and never for a new row count. Inductor's `emulate_precision_casts` rounds intermediates to the
model's dtype where eager does, so bf16 scores stay close to eager ones (the GPU-speed issue allows 1e-3).
The compile time is counted for the report (StageActivity.capture_seconds) and cached on disk by inductor, so a
restarted actor on the same node compiles faster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Widths are multiples of 64 up to the prompt budget, one graph each; the default of 8 would drop prompts of
# more than 512 tokens back to eager for good.
GRAPHS_PER_FUNCTION = 64


class CompiledForward:
    """`forward(input_ids, last_positions) -> logits` under torch.compile, compiled once per input width."""

    def __init__(self, forward: Callable):
        import torch
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True
        for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
            if hasattr(dynamo_config, limit):
                setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), GRAPHS_PER_FUNCTION))
        self._compiled = torch.compile(forward, dynamic=False)
        self.widths: set[int] = set()
        self.compile_seconds = 0.0

    def __call__(self, input_ids, last_positions):
        import torch

        # Rows vary with the batch, widths come from a few buckets: one graph per width, any row count.
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(last_positions, 0)
        width = int(input_ids.shape[1])
        if width in self.widths:
            return self._compiled(input_ids, last_positions)
        started = time.perf_counter()
        logits = self._compiled(input_ids, last_positions)
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        seconds = time.perf_counter() - started
        self.widths.add(width)
        self.compile_seconds += seconds
        logger.info("compiled the forward for width %d in %.1f s (%d widths, %.1f s in all)", width, seconds,
                    len(self.widths), self.compile_seconds)
        return logits
