"""How far each scoring forward's scores are from a float32 forward, for one adapter on labeled reviews (GPU).

    python benchmarks/gpu_score_precision.py --adapter /tmp/acc_r64/adapter --data .data/imdb/dev.parquet

Scores the reviews with the adapter's base + merged adapter as the score job does (`SentimentScorer`, hf backend):
float32 eager (the reference), bf16 eager and the bf16 compiled and packed forwards, each at two token budgets
(different forward shapes), and prints each variant's distance from the reference and from the first of `--forwards`
(bf16 eager by default), its label flips against that one and its accuracy (`compiled_graphs` needs `--device
cuda`).
BENCHMARKS §14 quotes it for the finetuned SmolLM2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True, help="Parquet with text and label (0/1) columns")
    parser.add_argument("--budgets", default="131072,32768", help="max_batch_tokens values, comma-separated")
    parser.add_argument("--forwards", default="eager,compiled,compiled_graphs,packed,compiled_packed",
                        help="bf16 forward modes to compare (the first is the one the others are compared with)")
    parser.add_argument("--limit", type=int, help="the first N reviews only")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script on a small set")
    args = parser.parse_args()
    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.scorer import SentimentScorer

    table = pq.read_table(args.data, columns=["text", "label"])
    table = table.slice(0, args.limit) if args.limit else table
    texts, labels = table.column("text").to_pylist(), np.array(table.column("label").to_pylist())

    def scores(dtype: str, budget: int, forward: str) -> np.ndarray:
        model = ScoringModelConfig(backend="hf", dtype=dtype, merge_adapter=True, device=args.device)
        scorer = SentimentScorer.from_adapter(args.adapter, model, budget, forward=forward)
        return np.array(scorer.score_texts(texts).scores)

    def accuracy(values: np.ndarray) -> float:
        return float(np.mean((values >= 0.5) == (labels == 1)))

    budgets = [int(b) for b in args.budgets.split(",")]
    reference = scores("float32", budgets[0], "eager")
    forwards = args.forwards.split(",")
    variants = {f"bf16 {forward} {budget}": scores("bfloat16", budget, forward)
                for forward in forwards for budget in budgets}
    baseline = variants[f"bf16 {forwards[0]} {budgets[0]}"]
    print(f"\n{len(texts)} reviews of {args.data}, adapter {args.adapter}; float32 eager accuracy "
          f"{accuracy(reference):.4f}")
    print(f"{'variant':24}{'vs fp32 mean':>14}{'p99':>10}{'max':>10}{'vs bf16 ' + forwards[0] + ' max':>19}{'p99':>10}"
          f"{'flips':>7}{'accuracy':>10}")
    for name, values in variants.items():
        to_reference, to_baseline = np.abs(values - reference), np.abs(values - baseline)
        flips = int(np.sum((values >= 0.5) != (baseline >= 0.5)))
        print(f"{name:24}{to_reference.mean():>14.2e}{np.quantile(to_reference, 0.99):>10.2e}"
              f"{to_reference.max():>10.2e}{to_baseline.max():>19.2e}{np.quantile(to_baseline, 0.99):>10.2e}"
              f"{flips:>7}{accuracy(values):>10.4f}")


if __name__ == "__main__":
    main()
