"""The scoring actor's own host work per batch, without the forward: is it what slows a fast GPU forward in the job?

    python benchmarks/score_stage_host_work.py [--rows 512] [--max-batch-tokens 131072]

A batch shaped like the job's (token ids as an Arrow list column, IMDB-like lengths of 60-384 tokens, the
pass-through columns), timed over 20 repeats (median) through the same code the score stage runs around its
forward: `_token_rows` (Arrow column to per-row arrays), the output columns, and the scorer's grouping and
padding of the forwards (`forward_groups`, `_padded`, on the CPU). No model is loaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(work, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=131072)
    args = parser.parse_args()
    import torch

    from sentiment_ray.model.scorer import SentimentScorer
    from sentiment_ray.scoring.stages import _token_rows

    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 385, args.rows)
    batch = pa.table({"tokens": pa.array([rng.integers(0, 49_152, n).tolist() for n in lengths], pa.list_(pa.int32())),
                      "status": ["pending"] * args.rows, "error": pa.nulls(args.rows, pa.string()),
                      "id": [f"row-{i}" for i in range(args.rows)]})
    rows = _token_rows(batch.column("tokens"))

    def columns_in_and_out():
        _token_rows(batch.column("tokens"))
        batch.column("status").to_pylist()
        batch.column("error").to_pylist()
        out = batch.drop_columns(["tokens", "status", "error"])
        for name, values, kind in (("label", ["positive"] * args.rows, pa.string()),
                                   ("label_id", [1] * args.rows, pa.int8()), ("score", [0.5] * args.rows, pa.float64()),
                                   ("status", ["ok"] * args.rows, pa.string()),
                                   ("adapter", ["adapter"] * args.rows, pa.string()),
                                   ("error", [None] * args.rows, pa.string())):
            out = out.append_column(name, pa.array(values, kind))

    # Only the padding code of the scorer is used: no model, tokenizer or adapter.
    scorer = SentimentScorer.__new__(SentimentScorer)
    scorer.pad_id, scorer.device, scorer.max_batch_tokens = 0, torch.device("cpu"), args.max_batch_tokens

    def group_and_pad():
        for group in scorer.forward_groups([len(r) for r in rows]):
            scorer._padded([rows[j] for j in group])

    results = {"Arrow rows in, output columns out": median_ms(columns_in_and_out),
               "group and pad the forwards": median_ms(group_and_pad)}
    print(f"\n{args.rows} rows, {int(lengths.mean())} tokens/row on average, forwards <= {args.max_batch_tokens} "
          f"tokens, {torch.get_num_threads()} torch threads")
    print(f"{'host work per batch':36}{'ms (median of 20)':>20}")
    for name, ms in results.items():
        print(f"{name:36}{ms:>20.2f}")
    print(f"{'total':36}{sum(results.values()):>20.2f}")


if __name__ == "__main__":
    main()
