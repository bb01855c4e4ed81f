"""Replaying one captured CUDA graph per forward shape instead of launching the model's kernels one by one.

A forward of SmolLM2-135M launches ~600 kernels, most of them small: the eager GPU stage kept the GPU busy only
64 % of the time (docs/BENCHMARKS.md §8). A CUDA graph records the launches once per shape and replays them in
one call. Shapes come from `forward_shapes.ShapeBuckets`, so a job sees a few dozen; each is captured the first
time it occurs (a warm-up forward on a side stream, then one recorded forward: milliseconds for a small model),
all graphs share one memory pool (they never run at once), and the capture time is counted for the report.

Why not `torch.compile(mode="reduce-overhead")`, which does the same plus fusion: compiling every shape took
minutes per actor (164 s for SmolLM2's widths, ~97 s for one dynamic 7B graph; §8), longer than a 100k-row job
takes, and in bf16 its scores moved by 0.004. Capturing the eager kernels costs milliseconds and replays the
exact kernels the eager forward runs for that shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _CapturedShape:
    graph: object  # torch.cuda.CUDAGraph
    input_ids: object  # static input buffers the replay reads
    last_positions: object
    logits: object  # the static output the replay writes


class CudaGraphForward:
    """`forward(input_ids, last_positions) -> logits`, replayed from a graph captured per input shape."""

    def __init__(self, forward: Callable, device):
        import torch

        self.forward = forward
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _CapturedShape] = {}
        self.capture_seconds = 0.0

    def __call__(self, input_ids, last_positions):
        captured = self.graphs.get(tuple(input_ids.shape)) or self._capture(input_ids, last_positions)
        captured.input_ids.copy_(input_ids, non_blocking=True)
        captured.last_positions.copy_(last_positions, non_blocking=True)
        captured.graph.replay()
        # A copy: the next replay of any graph of the pool may overwrite the static output.
        return captured.logits.clone()

    def _capture(self, input_ids, last_positions) -> _CapturedShape:
        import torch

        started = time.perf_counter()
        static_ids, static_last = input_ids.clone(), last_positions.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, ...) must not happen in the capture
            self.forward(static_ids, static_last)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_logits = self.forward(static_ids, static_last)
        captured = _CapturedShape(graph, static_ids, static_last, static_logits)
        self.graphs[tuple(input_ids.shape)] = captured
        seconds = time.perf_counter() - started
        self.capture_seconds += seconds
        logger.debug("captured a CUDA graph for forwards of shape %s in %.3f s (%d shapes, %.1f s in all)",
                     tuple(input_ids.shape), seconds, len(self.graphs), self.capture_seconds)
        return captured
