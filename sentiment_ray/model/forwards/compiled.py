"""The scoring forward with each decoder layer under `torch.compile`: fused elementwise kernels, compiled once.

The eager forward spends much of its GPU time in small unfused kernels (RMSNorm, RoPE, SiLU x mul, residual adds:
~37 % of the 7B scorer's, and most of SmolLM2's; docs/BENCHMARKS.md §8), which inductor fuses. Two earlier tries
compiled the whole decoder and lost inside the job (§8, §12): inductor compiled the 30 or 32 layers inlined into
one graph, 60-100 s per graph, and either once per padded width (static shapes) or once but slowly (dynamic).

Here each decoder layer is compiled on its own ("regional compilation", PyTorch's recipe for repeated blocks).
All layers run the same code with their weights as graph inputs, so dynamo traces one layer, inductor compiles
one graph, and every layer reuses it. Shapes are dynamic (rows and width symbolic; the hidden sizes are fixed by
the weights), so the length-sorted eager groups run as they are: no padding to buckets, and no new compile for a
new width or row count (a single-row forward gets its own graph: torch specializes sizes of 1). Inductor's
`emulate_precision_casts` rounds intermediates to the model's dtype where eager does, so bf16 scores stay close
to eager ones. Compile seconds are counted (the ledger's capture_seconds) and inductor caches the compiled graph
on disk in the product's cache folder (compile_cache.py), so a later job or a restarted actor on the same node
loads it instead of compiling; the log line of each compile says whether that cache was hit.

Measured on an H200 (docs/BENCHMARKS.md §14): one graph, 7-11 s to compile cold; SmolLM2's bare forward 2.18x
eager and the job's steady rate 1.52x; the 7B's 1.23x and 1.25x. The compiled forward is still bound by the
Python thread that launches its kernels; `forward: compiled_graphs` captures them per shape (graphed_forward.py):
SmolLM2's job 2.76x eager (§15); `forward: compiled_packed` runs them on packed rows without padding
(packed_forward.py): the 7B job's scoring 1.8x eager (§16). Not bit-equal to eager in bf16: fused kernels
reduce and round in other places (inductor's emulation narrows it, cannot close it), and 30 layers carry the
difference to the scores. Against a float32 forward, compiled and eager bf16 scores are equally far off (mean
2.2e-3, p99 ~3e-2 on a finetuned SmolLM2), so the choice changes the noise of bf16, not its size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompiledDecoderLayers:
    """Compiles a decoder's layers in place; `run(forward, *args)` calls a forward that goes through them and
    counts the seconds of the calls in which something was compiled."""

    def __init__(self, decoder):
        import torch
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            raise ValueError(f"forward=compiled needs a decoder with a `layers` list; {type(decoder).__name__} "
                             "has none")
        from sentiment_ray.model.forwards.compile_cache import compile_cache_counts, use_compile_cache

        self.cache_folder = use_compile_cache(next(decoder.parameters()).device)
        self._cache_counts = compile_cache_counts
        self._cache_at_start = compile_cache_counts()
        inductor_config.emulate_precision_casts = True
        # Dynamo gives sizes equal at the first call one symbol ("duck shaping"), and compiles again when they
        # differ later: a 64-row forward of width 64 would cost a second graph. One symbol per size instead.
        fx_config.use_duck_shape = False
        self.layers = list(layers)
        for layer in self.layers:
            layer.compile(dynamic=True)
        self.compile_seconds = 0.0
        self.graphs = 0
        self.active = True

    def run(self, forward: Callable, *args):
        import torch

        before = _graphs_compiled()
        cache_before = self._cache_counts()
        started = time.perf_counter()
        try:
            result = forward(*args)
        except Exception as exc:  # noqa: BLE001 - only before anything compiled: a compiler that cannot run here
            if self.graphs or not self.active:
                raise
            logger.warning("compiling the decoder layers failed (%s: %s); scoring eager", type(exc).__name__,
                           str(exc)[:300])
            self.uncompile()
            return forward(*args)
        new = _graphs_compiled() - before
        if new:
            # Not inside a CUDA graph capture (compiled_graphs), where a synchronize is an error; compiles happen
            # in the warm-up forward before it.
            if args and getattr(args[0], "is_cuda", False) and not torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize(args[0].device)
            seconds = time.perf_counter() - started
            self.graphs += new
            self.compile_seconds += seconds
            logger.info("compiled %d graph(s) of the decoder layer in %.1f s (%d graphs, %.1f s in all): compile %s, "
                        "%s", new, seconds, self.graphs, self.compile_seconds,
                        self._cache_counts().since(cache_before).describe(), self.cache_folder)
        return result

    @property
    def cache_counts(self):
        """CompileCacheCounts of this decoder's compiles so far: hits mean a warm start."""
        return self._cache_counts().since(self._cache_at_start)

    def uncompile(self) -> None:
        # nn.Module.compile keeps the compiled call beside the module's own; clearing it restores eager.
        for layer in self.layers:
            layer._compiled_call_impl = None
        self.active = False
