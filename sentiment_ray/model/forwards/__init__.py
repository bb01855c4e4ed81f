"""The scoring forwards beyond eager, chosen by `forward:` in a score config (SentimentScorer dispatches).

    shapes.py         a few fixed forward shapes (width x rows), so that graphs and compiles are reused
    packed.py         reviews packed end to end into one row: no padding (flash varlen on GPU, SDPA mask on CPU)
    compiled.py       each decoder layer under torch.compile
    graphed.py        one captured CUDA graph per forward shape
    compile_cache.py  inductor's caches in the product's cache folder, so that a second job compiles nothing
"""
