"""Replaying one captured CUDA graph per forward shape instead of launching the model's kernels one by one.

A forward of SmolLM2-135M launches ~600 kernels, most of them small: the eager GPU stage kept the GPU busy only
64 % of the time (docs/BENCHMARKS.md §8). A CUDA graph records the launches once per shape and replays them in
one call. Shapes come from `forward_shapes.ShapeBuckets`, so a job sees a few dozen; each is captured the first
time it occurs (a warm-up forward on a side stream, then one recorded forward: milliseconds for a small model),
all graphs share one memory pool (they never run at once), and the capture time is counted for the report.

Why not `torch.compile(mode="reduce-overhead")`, which does the same plus fusion: compiling the whole decoder for
every shape took minutes per actor (164 s for SmolLM2's widths, ~97 s for one dynamic 7B graph; §8), longer than a
100k-row job takes. Capturing the eager kernels costs milliseconds and replays the exact kernels the eager forward
runs for that shape. `forward: compiled_graphs` captures the kernels of the compiled layers instead
(compiled_forward.py: one dynamic graph per actor, compiled in seconds), as vLLM captures its compiled model:
fusion and no launches, 5,199 vs 1,884 reviews/s eager in SmolLM2's scoring job (docs/BENCHMARKS.md §15).

The graphed forward runs the decoder's steps itself (`causal_decoder_hidden`): inside a capture transformers
builds a full attention mask, which slowed the captured eager forward and made compiled layers recompile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sentiment_ray.config import ForwardUnavailable

logger = logging.getLogger(__name__)


@dataclass
class _CapturedShape:
    graph: object  # torch.cuda.CUDAGraph
    input_ids: object  # static input buffers the replay reads
    last_positions: object
    logits: object  # the static output the replay writes


def causal_decoder_hidden(decoder, input_ids):
    """The decoder's last hidden states for right-padded rows, with no attention mask: transformers 5's own
    decoder steps (embeddings, rotary position embeddings, the layers, the final norm) without its mask builder.

    Under a CUDA graph capture transformers cannot check on the host that no mask is needed, so it builds a full
    one; SDPA then leaves its causal flash kernel for a masked one, and compiled layers see a mask they were not
    compiled for and compile again inside the capture, which fails. Causal attention needs no mask for right
    padding (scorer._logits_of), so the layers get none, as in an eager forward outside a capture."""
    import torch

    hidden = decoder.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder.layers[:decoder.config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings,
                       use_cache=False)
    return decoder.norm(hidden)


def check_plain_causal_decoder(decoder, max_tokens: int, forward: str = "cuda_graphs") -> None:
    """causal_decoder_hidden and packed_forward.packed_last_hidden run a decoder of transformers' Llama family
    (Llama, Mistral, Qwen2, SmolLM2) whose attention over a prompt of up to `max_tokens` is plain causal; anything
    else is refused, not run differently."""
    missing = [name for name in ("embed_tokens", "rotary_emb", "layers", "norm") if not hasattr(decoder, name)]
    if missing:
        raise ForwardUnavailable(f"forward={forward} needs a Llama-family decoder; {type(decoder).__name__} has no "
                         f"{', '.join(missing)}")
    window = getattr(decoder.config, "sliding_window", None)
    if window is not None and getattr(decoder.config, "use_sliding_window", True) and window < max_tokens:
        raise ForwardUnavailable(f"forward={forward} runs plain causal attention; this model attends within a sliding "
                         f"window of {window} tokens, shorter than prompts of up to {max_tokens}")


class CudaGraphForward:
    """`forward(input_ids, last_positions) -> logits`, replayed from a graph captured per input shape."""

    def __init__(self, forward: Callable, device, compile_seconds: Callable[[], float] = lambda: 0.0):
        import torch

        self.forward = forward
        # The compiler's running total: a compile inside a capture's warm-up is counted there, not again here.
        self.compile_seconds = compile_seconds
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

        started, compiled_before = time.perf_counter(), self.compile_seconds()
        static_ids, static_last = input_ids.clone(), last_positions.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, ...) must not happen in the capture
            self.forward(static_ids, static_last)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up's stream, and with compiled layers (forward: compiled_graphs) never compiling
        # inside the capture: inductor synchronizes while it compiles, which a capture forbids. The warm-up has
        # compiled what this shape needs; should dynamo still miss its cache here, that frame is recorded eager.
        with torch.compiler.set_stance("eager_on_recompile"), torch.cuda.graph(graph, pool=self.pool, stream=side):
            static_logits = self.forward(static_ids, static_last)
        captured = _CapturedShape(graph, static_ids, static_last, static_logits)
        self.graphs[tuple(input_ids.shape)] = captured
        seconds = time.perf_counter() - started - (self.compile_seconds() - compiled_before)
        self.capture_seconds += seconds
        logger.debug("captured a CUDA graph for forwards of shape %s in %.3f s (%d shapes, %.1f s in all)",
                     tuple(input_ids.shape), seconds, len(self.graphs), self.capture_seconds)
        return captured
