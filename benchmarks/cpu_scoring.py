"""Scoring throughput on CPU: adapter kept vs merged (bare loop), and the Ray Data job, same rows and batch.

    python benchmarks/cpu_scoring.py --adapter demo_output/run-*/adapter --rows 200 --repeats 3

Prints a table of medians. The Ray Data figure is end to end (actor start-up and model load included), as a
user sees it; the ratio says what the pipeline costs on top of the model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from sentiment_ray.config import RayConfig, ScoreConfig, ScoringModelConfig
from sentiment_ray.demo.job import DEMO_DATA
from sentiment_ray.model.scorer import SentimentScorer
from sentiment_ray.ops.ray_cluster import ensure_ray
from sentiment_ray.scoring import run_scoring


def bare_loop(adapter: str, texts: list[str], batch_size: int, threads: int, merge: bool) -> float:
    import torch

    torch.set_num_threads(threads)
    scorer = SentimentScorer.from_adapter(adapter,
                                          ScoringModelConfig(backend="hf", dtype="bfloat16", merge_adapter=merge))
    scorer.score_texts(texts[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        scorer.score_texts(texts[start:start + batch_size])
    return len(texts) / (time.perf_counter() - started)


def ray_job(adapter: str, input_file: Path, out: Path, batch_size: int, threads: int, merge: bool) -> float:
    cfg = ScoreConfig(input=str(input_file), output=str(out), adapter=adapter, batch_size=batch_size, pool_size=1,
                      num_cpus_per_actor=threads,
                      model=ScoringModelConfig(backend="hf", dtype="bfloat16", merge_adapter=merge))
    return run_scoring(cfg).rows_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    table = pq.read_table(DEMO_DATA / "dev_sample.parquet").slice(0, args.rows)
    pq.write_table(table, work / "input.parquet")
    texts = table.column("text").to_pylist()
    ensure_ray(RayConfig(address="local", num_cpus=args.threads + 1))

    runs = {"bare loop, adapter kept": [], "bare loop, adapter merged": [], "Ray Data job, merged (end to end)": []}
    for i in range(args.repeats):  # interleaved, so drifts in machine load hit every path alike
        runs["bare loop, adapter kept"].append(bare_loop(args.adapter, texts, args.batch_size, args.threads, False))
        runs["bare loop, adapter merged"].append(bare_loop(args.adapter, texts, args.batch_size, args.threads, True))
        runs["Ray Data job, merged (end to end)"].append(
            ray_job(args.adapter, work / "input.parquet", work / f"out{i}", args.batch_size, args.threads, True))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"\n{'path':36}{'median rows/s':>15}{'runs':>30}")
    for name, values in runs.items():
        print(f"{name:36}{medians[name]:>15.2f}{str([round(x, 2) for x in values]):>30}")
    kept, merged, piped = medians.values()
    print(f"merged / kept: {merged / kept:.2f};  Ray Data / bare merged: {piped / merged:.2f}"
          f"  ({args.rows} rows, batch {args.batch_size}, {args.threads} threads, bf16)")


if __name__ == "__main__":
    main()
