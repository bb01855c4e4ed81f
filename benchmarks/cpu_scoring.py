"""Scoring throughput on CPU: the bare in-process loop vs the Ray Data job, same adapter, rows and batch size.

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

from sentiment_ray.config import ModelConfig, RayConfig, ScoreConfig
from sentiment_ray.demo import DEMO_DATA
from sentiment_ray.ray_cluster import ensure_ray
from sentiment_ray.scorer import SentimentScorer
from sentiment_ray.scoring import run_scoring


def bare_loop(adapter: str, texts: list[str], batch_size: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    scorer = SentimentScorer.from_adapter(adapter, ModelConfig(name_or_path="", backend="hf", dtype="bfloat16"))
    scorer.score_texts(texts[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        scorer.score_texts(texts[start:start + batch_size])
    return len(texts) / (time.perf_counter() - started)


def ray_job(adapter: str, input_file: Path, out: Path, batch_size: int, threads: int) -> float:
    cfg = ScoreConfig(input=str(input_file), output=str(out), adapter=adapter, batch_size=batch_size, pool_size=1,
                      num_cpus_per_actor=threads, model=ModelConfig(name_or_path="", backend="hf", dtype="bfloat16"))
    return run_scoring(cfg)["rows_per_second"]


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

    bare = [bare_loop(args.adapter, texts, args.batch_size, args.threads) for _ in range(args.repeats)]
    piped = [ray_job(args.adapter, work / "input.parquet", work / f"out{i}", args.batch_size, args.threads)
             for i in range(args.repeats)]
    print(f"\n{'path':32}{'median rows/s':>15}{'runs':>30}")
    print(f"{'bare loop (in-process)':32}{statistics.median(bare):>15.2f}{str([round(x, 2) for x in bare]):>30}")
    print(f"{'Ray Data job (end to end)':32}{statistics.median(piped):>15.2f}{str([round(x, 2) for x in piped]):>30}")
    print(f"ratio Ray Data / bare: {statistics.median(piped) / statistics.median(bare):.2f}"
          f"  ({args.rows} rows, batch {args.batch_size}, {args.threads} threads, bf16)")


if __name__ == "__main__":
    main()
