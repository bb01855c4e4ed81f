"""The scoring forward alone on CPU: eager (one padded forward per batch) vs packed (the batch's rows end to end).

    python benchmarks/cpu_forward.py --max-length 384 --max-length 128

SmolLM2-135M-Instruct (the embedded model, bf16, zero-shot: an adapter merged into it costs the same), the demo's
dev sample, batches of `--batch-size` rows as the CPU score config hands its actor, `--threads` torch threads.
Each batch is one forward either way: eager pads it to its longest row (the CPU config sets no token budget),
packed holds only real tokens and runs each row's attention as its own causal SDPA call (packed_forward.py).
The two alternate `--repeats` times (so drifts in machine load hit both alike); medians, and the batches' padded
over real tokens, for each prompt budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PACK_ANY_BATCH = 1 << 30  # a token budget no batch reaches: one packed forward per batch, as eager's one per batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, action="append", help="prompt budgets in tokens (repeatable)")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.demo.job import DEMO_DATA
    from sentiment_ray.model.names import EMBEDDED_MODEL
    from sentiment_ray.model.prompt import PromptSpec
    from sentiment_ray.model.scorer import SentimentScorer

    torch.set_num_threads(args.threads)
    texts = pq.read_table(DEMO_DATA / "dev_sample.parquet").column("text").to_pylist()[:args.rows]
    model = ScoringModelConfig(name_or_path=EMBEDDED_MODEL, backend="hf", dtype="bfloat16")
    rows = []
    for max_length in args.max_length or [384]:
        scorer = SentimentScorer.zero_shot(model, PromptSpec(max_length=max_length), max_batch_tokens=PACK_ANY_BATCH)
        prompts = [p for p in scorer.preparer.prepare(texts).input_ids if p]
        batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
        padded = sum(len(b) * max(map(len, b)) for b in batches) / sum(map(len, prompts))
        seconds: dict[str, list[float]] = {"eager": [], "packed": []}
        scores: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for forward in seconds:
                scorer.max_batch_tokens = None if forward == "eager" else PACK_ANY_BATCH
                scorer.use_forward(forward)
                scorer.score_token_ids(batches[0])  # warm-up
                started = time.perf_counter()
                scores[forward] = [s for batch in batches for s in scorer.score_token_ids(batch)]
                seconds[forward].append(time.perf_counter() - started)
        eager, packed = (statistics.median(seconds[f]) for f in ("eager", "packed"))
        worst = max(abs(a - b) for a, b in zip(scores["eager"], scores["packed"]))
        rows.append((max_length, padded, len(prompts) / eager, len(prompts) / packed, eager / packed, worst))
    print(f"\nSmolLM2-135M bf16 on CPU, {args.threads} threads, {len(texts)} reviews, batches of {args.batch_size}, "
          f"medians of {args.repeats}")
    print(f"{'prompt budget':>14}{'padded/real':>13}{'eager rows/s':>14}{'packed rows/s':>15}{'packed/eager':>14}"
          f"{'max |diff|':>12}")
    for max_length, padded, eager, packed, ratio, worst in rows:
        print(f"{max_length:>14}{padded:>13.3f}{eager:>14.2f}{packed:>15.2f}{ratio:>14.2f}{worst:>12.2e}")


if __name__ == "__main__":
    main()
