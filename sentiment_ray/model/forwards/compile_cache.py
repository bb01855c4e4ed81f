"""torch.compile's on-disk caches in the product's cache folder, so that a second job compiles nothing.

Inductor keeps what it compiled (FX graphs and their kernels, and the AOTAutograd wrappers around them) in a
folder keyed inside by graph, shapes and settings. By default that folder is /tmp/torchinductor_<user>: emptied
with /tmp, and shared by every program that compiles. The scoring actors point it at
`<SENTIMENT_RAY_CACHE>/torch-compile/<torch version>-<CUDA version>-<device>/` instead, next to the adapter copies
of the same node, so a job on a machine that has run the same model once loads its compiled layers from disk
(dynamo still traces the one decoder layer, a second or two; inductor's compile and Triton's kernel builds, the
rest of the 6-14 s of a cold compile, are skipped). Weights are graph inputs, not constants, so every adapter of
one base model shares the entries.

A TORCHINDUCTOR_CACHE_DIR set by the user wins. Whether the cache was hit is read from torch's own counters and
logged by the scorer after its warm-up compile.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CompileCacheCounts:
    """Inductor's FX-graph cache, hits and misses so far in this process: a miss is a graph inductor compiled.
    (AOTAutograd's cache is on too, but it also looks up small graphs that inductor never compiles, which miss on
    every run and cost nothing.)"""

    hits: int
    misses: int

    def since(self, before: CompileCacheCounts) -> CompileCacheCounts:
        return CompileCacheCounts(self.hits - before.hits, self.misses - before.misses)

    def describe(self) -> str:
        if not self.hits and not self.misses:
            return "no cache lookups"
        if not self.misses:
            return f"cache hit ({self.hits} graphs loaded)"
        return f"cache miss ({self.misses} graphs compiled and saved, {self.hits} loaded)"


def cache_key(device=None) -> str:
    """torch version, CUDA version and device model: what makes compiled kernels unusable elsewhere."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    raw = f"torch-{torch.__version__}-cuda-{torch.version.cuda or 'none'}-{name}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw)


def compile_cache_dir(device=None) -> Path:
    from sentiment_ray.model.embedded import cache_dir

    return cache_dir() / "torch-compile" / cache_key(device)


def use_compile_cache(device=None) -> Path:
    """Point inductor's caches at the product's folder (unless the user chose one) and make sure both the FX-graph
    and the AOTAutograd caches are on; returns the folder in use. Call before the first compile."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default into the variable the first time it looks, so a value equal to the default is
    # torch's own, not the user's.
    if not given or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        folder = compile_cache_dir(device)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_cache_counts() -> CompileCacheCounts:
    from torch._dynamo.utils import counters

    return CompileCacheCounts(hits=counters["inductor"]["fxgraph_cache_hit"],
                              misses=counters["inductor"]["fxgraph_cache_miss"])
