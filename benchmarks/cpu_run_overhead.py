"""What one tiny scoring run costs on a 2-core CPU machine, in wall and CPU seconds (issue 30): the tiny random
model, 1,800 reviews in 3 files, `configs/score/tiny_test.yaml` (with the overrides given: BENCHMARKS §20-21), on
one local Ray of 3 logical CPUs, several runs in a row as the tests make them.

    python benchmarks/cpu_run_overhead.py --runs 3                       # Ray's defaults
    RAY_idle_worker_killing_time_threshold_ms=600000 python benchmarks/cpu_run_overhead.py --runs 3
    RAY_idle_worker_killing_time_threshold_ms=600000 python benchmarks/cpu_run_overhead.py --runs 3 pool_size=1

CPU seconds are the machine's (/proc/stat user + nice + system) over the run: the driver, the actors, Ray's
workers and daemons. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IDLE_WORKER_THRESHOLD = "RAY_idle_worker_killing_time_threshold_ms"  # Ray reads it as spelled


def machine_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]
    return sum(int(f) for f in fields) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides (`section.key=value`) for every run")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="sr-overhead-"))
    os.environ.update(HOME=str(work / "home"), SENTIMENT_RAY_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from sentiment_ray.config import ScoreConfig, load_config
    from sentiment_ray.model.tiny import build_tiny_model, synthetic_reviews
    from sentiment_ray.scoring import run_scoring
    from tests.conftest import random_adapter

    # the tests' own random adapter (tests/conftest.py), built by its fixture function outside pytest
    adapter = random_adapter.__wrapped__(build_tiny_model(work / "model"), _Factory(work))
    reviews = work / "reviews"
    reviews.mkdir()
    texts, _ = synthetic_reviews(1800, seed=9)
    for part in range(3):
        rows = slice(part * 600, (part + 1) * 600)
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows.start, rows.stop)], "text": texts[rows]}),
                       reviews / f"part-{part}.parquet", row_group_size=200)
    ray_tmp = tempfile.mkdtemp(prefix="sr-o-", dir="/tmp")
    ray.init(address="local", num_cpus=3, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    walls, cpus = [], []
    try:
        for run in range(args.runs):
            cpu, started = machine_cpu_seconds(), time.perf_counter()
            run_scoring(load_config(ScoreConfig, REPO / "configs" / "score" / "tiny_test.yaml", [
                f"adapter={adapter}", f"input={reviews}", f"output={work / f'out-{run}'}", "model.dtype=float32",
                "unit_rows=256", *args.overrides]))
            walls.append(time.perf_counter() - started)
            cpus.append(machine_cpu_seconds() - cpu)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    threshold = os.environ.get(IDLE_WORKER_THRESHOLD, "Ray's default")
    print(f"{IDLE_WORKER_THRESHOLD}: {threshold}; {args.runs} runs; overrides {args.overrides or 'none'}")
    print(f"{'run':>4}{'wall s':>9}{'CPU s':>9}")
    for run, (wall, cpu) in enumerate(zip(walls, cpus)):
        print(f"{run:>4}{wall:>9.1f}{cpu:>9.1f}")
    print(f"median wall {statistics.median(walls):.1f} s, CPU {statistics.median(cpus):.1f} s")


class _Factory:
    """The one method of pytest's tmp_path_factory that the random_adapter fixture uses."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return path


if __name__ == "__main__":
    main()
