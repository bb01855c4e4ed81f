"""Scoring job on a multi-GPU machine: one actor per GPU vs one actor, same machine, same reviews.

    python benchmarks/gpu_scoring_pool.py --data .data/imdb/dev.parquet --work /tmp/bench --out $OUT

Steady-state reviews/s for each pool size from two input sizes (start-up cancels in the difference), with the
bf16-merged variant that benchmarks/gpu_scoring.py measured fastest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import build_random_mistral_7b, gpu_name  # noqa: E402
from benchmarks.gpu_scoring import make_adapter, ray_job  # noqa: E402


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", type=int, default=640)
    parser.add_argument("--large", type=int, default=5106)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    adapter = make_adapter(build_random_mistral_7b(work / "mistral7b-random", texts), work / "adapter-random-7b")
    gpus = torch.cuda.device_count()
    report = {"gpu": f"{gpus} x {gpu_name()}", "pools": {}}
    for pool in sorted({1, gpus}):
        small = ray_job("hf-bf16-merged", adapter, args.data, args.small, work, 256, 32768, pool)
        large = ray_job("hf-bf16-merged", adapter, args.data, args.large, work, 256, 32768, pool)
        steady = (large["rows"] - small["rows"]) / (large["seconds"] - small["seconds"])
        report["pools"][pool] = {"small": small, "large": large, "steady_reviews_per_second": steady}
        (out / "gpu_scoring_pool.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['gpu']}, Mistral-7B architecture, bf16 merged adapter, IMDB dev reviews")
    print(f"{'actors':>7}{'steady reviews/s':>18}{'end to end':>12}")
    for pool, r in report["pools"].items():
        print(f"{pool:>7}{r['steady_reviews_per_second']:>18.1f}{r['large']['reviews_per_second']:>12.1f}")
    if len(report["pools"]) == 2:
        one, many = (report["pools"][p]["steady_reviews_per_second"] for p in sorted(report["pools"]))
        print(f"scaling x{many / one:.2f} with {gpus} GPUs")


if __name__ == "__main__":
    main()
