"""Soak test of the scoring job: N real IMDB reviews (tiled, unique ids), one actor killed and one driver killed.

    python benchmarks/soak_scoring.py --rows 100000 --rows 1000000
    python benchmarks/soak_scoring.py --rows 100000 --s3     # the output on a local S3 server (moto)
    python benchmarks/soak_scoring.py --rows 100000 --kill-node   # a two-node cluster loses a node for good

For each size: tile IMDB dev into `--files` Parquet files with unique ids, run `sentiment-ray score` (zero-shot,
the tiny random Mistral, 2 scoring actors) as a subprocess with the actor-exit test hook armed, SIGKILL the
driver and everything it started once `--kill-at` of the work units are committed (their fragments tile them),
rerun the same command with --resume, then check rows in == rows out and 0 duplicate ids. Peak RSS of the
driver process and of each scoring actor is sampled every 0.5 s with psutil. With --s3 the output goes to a
bucket of a moto server this script starts (configured only through AWS_* variables). Prints one table row per
size (and writes JSON with --json).

With --kill-node, instead of the two kills: a two-node cluster on this machine (ray.cluster_utils.Cluster: a head
with 2 CPUs and a node with 1, one `scorer` each, so each holds one of the 2 scoring actors) runs the command,
and every process of the second node is SIGKILLed (its raylet included) once `--kill-at` of the units are
committed, with no node joining after; the same run must finish on the head alone (issue 28).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMDB_CANDIDATES = [REPO.parent / "shared" / "data" / "imdb" / "dev.parquet", REPO / ".data" / "imdb" / "dev.parquet"]
ACTOR_TITLE = "ScoreStage"  # Ray names actor processes ray::MapWorker(MapBatches(ScoreStage))


def tile_imdb(source: Path, rows: int, files: int, folder: Path, row_group_rows: int) -> None:
    texts = pq.read_table(source, columns=["text"]).column("text").combine_chunks()
    per_file = -(-rows // files)
    for part in range(files):
        start, stop = part * per_file, min(rows, (part + 1) * per_file)
        index = pa.array(range(start, stop), pa.int64())
        table = pa.table({"id": pc.binary_join_element_wise("imdb-", pc.cast(index, pa.string()), ""),
                          "text": texts.take(pc.remainder(index, len(texts)))})
        pq.write_table(table, folder / f"part-{part:03d}.parquet", row_group_size=row_group_rows)


class RssSampler:
    """Peak resident memory of the driver process and of the largest scoring actor seen."""

    def __init__(self):
        self.driver_peak = self.actor_peak = 0

    def sample(self, driver: psutil.Process) -> None:
        try:
            self.driver_peak = max(self.driver_peak, driver.memory_info().rss)
            for child in driver.children(recursive=True):
                try:
                    if ACTOR_TITLE in " ".join(child.cmdline()):
                        self.actor_peak = max(self.actor_peak, child.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        except psutil.NoSuchProcess:
            pass


def committed_units(output: str) -> int:
    """Units whose rows the fragments already in the output hold exactly once."""
    from sentiment_ray.io.storage import location
    from sentiment_ray.scoring.output import PLAN_FILE, Fragment, tile
    from sentiment_ray.scoring.plan import ScorePlan

    folder = location(output)
    if not folder.join(PLAN_FILE).is_file():
        return 0
    fragments = [f for f in (Fragment.parse(c.name) for c in folder.children()) if f is not None]
    return sum(tile(u, fragments) is not None for u in ScorePlan.from_json(folder.join(PLAN_FILE).read_text()).units)


def planned_units(output: str) -> int | None:
    from sentiment_ray.io.storage import location
    from sentiment_ray.scoring.output import PLAN_FILE

    plan = location(output).join(PLAN_FILE)
    return len(json.loads(plan.read_text())["units"]) if plan.is_file() else None


def start_s3_server(work: Path) -> subprocess.Popen:
    """A moto S3 server on a free port, the AWS_* variables pointing at it, and a bucket named `soak-bucket`."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(work / "moto.log", "w") as log:  # the server holds its own copy of the descriptor
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    for _ in range(100):
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    import pyarrow.fs as pafs

    pafs.FileSystem.from_uri("s3://soak-bucket?allow_bucket_creation=true")[0].create_dir("soak-bucket")
    return server


def run_score(command: list[str], env: dict, log: Path, sampler: RssSampler,
              kill_at: float | None) -> tuple[float, bool]:
    """Run the score command; SIGKILL its process group once `kill_at` of the planned units are committed."""
    output = command[command.index("--output") + 1]
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=REPO)
        handle = psutil.Process(process.pid)
        while process.poll() is None:
            sampler.sample(handle)
            total = planned_units(output) if kill_at is not None else None
            if total and committed_units(output) >= max(1, int(total * kill_at)):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return time.perf_counter() - started, True
            time.sleep(0.5)
    if process.returncode != 0:
        raise RuntimeError(f"score exited {process.returncode}; see {log}")
    return time.perf_counter() - started, False


def soak_node_kill(rows: int, args, work: Path) -> dict:
    """One run on a two-node cluster whose second node is killed mid-run and not replaced."""
    import ray
    from ray.cluster_utils import Cluster

    from sentiment_ray.io.storage import location

    inputs, output = work / f"in-{rows}", f"s3://soak-bucket/out-{rows}" if args.s3 else str(work / f"out-{rows}")
    inputs.mkdir(parents=True)
    tile_imdb(next(p for p in IMDB_CANDIDATES if p.exists()), rows, args.files, inputs, args.unit_rows)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sr-soak-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"scorer": 1},
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, resources={"scorer": 1})
    try:
        command = [sys.executable, "-m", "sentiment_ray.cli", "score", "--input", str(inputs), "--output", output,
                   "--pool-size", "2", "--batch-size", str(args.batch_size),
                   "model.name_or_path=embedded:tiny-random-mistral", "model.dtype=float32", "num_cpus_per_actor=1",
                   "actor_resources={scorer: 1}", f"unit_rows={args.unit_rows}", f"ray.address={cluster.address}",
                   f"prompt.max_length={args.max_length}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        sampler = RssSampler()
        started = time.perf_counter()
        with open(work / f"node-kill-{rows}.log", "w") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            handle, killed_at, at_kill = psutil.Process(process.pid), None, None
            while process.poll() is None:
                sampler.sample(handle)
                total = planned_units(output) if killed_at is None else None
                if total and committed_units(output) >= max(1, int(total * args.kill_at)):
                    at_kill, killed_at = committed_units(output), time.perf_counter()
                    cluster.remove_node(worker, allow_graceful=False)  # the raylet and its workers, SIGKILL
                time.sleep(0.5)
        ended = time.perf_counter()
        if process.returncode != 0:
            raise RuntimeError(f"score exited {process.returncode}; see {work / f'node-kill-{rows}.log'}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    folder = location(output)
    dataset = pads.dataset(folder.path, filesystem=folder.filesystem, format="parquet")
    ids = dataset.to_table(columns=["id"]).column("id")
    manifest = json.loads(folder.join("_sentiment_ray_manifest.json").read_text())
    log = (work / f"node-kill-{rows}.log").read_text()
    return {
        "rows_in": rows, "rows_out": len(ids), "duplicate_ids": len(ids) - pc.count_distinct(ids).as_py(),
        "node_killed": killed_at is not None, "pipelines_reformed": log.count("re-forming the pipeline"),
        "units": manifest["units"]["total"], "units_committed_at_kill": at_kill,
        "run_s": round(ended - started, 1), "after_kill_s": round(ended - killed_at, 1) if killed_at else None,
        "rows_per_s": round(rows / (ended - started), 1),
        "driver_peak_rss_mb": round(sampler.driver_peak / 2**20),
        "status_counts": manifest["status_counts"],
    }


def soak(rows: int, args, work: Path) -> dict:
    inputs = work / f"in-{rows}"
    output = f"s3://soak-bucket/out-{rows}" if args.s3 else str(work / f"out-{rows}")
    inputs.mkdir(parents=True)
    source = next(p for p in IMDB_CANDIDATES if p.exists())
    tile_imdb(source, rows, args.files, inputs, args.unit_rows)
    command = [sys.executable, "-m", "sentiment_ray.cli", "score", "--input", str(inputs), "--output", output,
               "--pool-size", str(args.pool_size), "--batch-size", str(args.batch_size),
               *([f"max_batch_tokens={args.max_batch_tokens}"] if args.max_batch_tokens else []),
               "model.name_or_path=embedded:tiny-random-mistral", "model.dtype=float32", "num_cpus_per_actor=1",
               f"unit_rows={args.unit_rows}", "ray.address=local", "ray.num_cpus=3",
               f"prompt.max_length={args.max_length}"]
    marker = work / f"actor-killed-{rows}"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="sr-soak-", dir="/tmp"),
           "SENTIMENT_RAY_FAULT_ACTOR_EXIT_AFTER_BATCHES": str(args.actor_exit_after_batches),
           "SENTIMENT_RAY_FAULT_MARKER": str(marker)}
    env.pop("RAY_ADDRESS", None)
    sampler = RssSampler()
    first_s, killed = run_score(command, env, work / f"first-{rows}.log", sampler, args.kill_at)
    at_kill = committed_units(output)
    resume_s, _ = run_score([*command, "--resume"], env, work / f"resume-{rows}.log", sampler, None)
    from sentiment_ray.io.storage import location

    folder = location(output)
    dataset = pads.dataset(folder.path, filesystem=folder.filesystem, format="parquet")
    ids = dataset.to_table(columns=["id"]).column("id")
    manifest = json.loads(folder.join("_sentiment_ray_manifest.json").read_text())
    return {
        "rows_in": rows, "rows_out": len(ids), "duplicate_ids": len(ids) - pc.count_distinct(ids).as_py(),
        "actor_killed": marker.exists(), "driver_killed": killed, "units": manifest["units"]["total"],
        "units_committed_at_kill": at_kill,
        "first_run_s": round(first_s, 1), "resume_run_s": round(resume_s, 1),
        "rows_per_s": round(rows / (first_s + resume_s), 1),
        "driver_peak_rss_mb": round(sampler.driver_peak / 2**20),
        "actor_peak_rss_mb": round(sampler.actor_peak / 2**20),
        "status_counts": manifest["status_counts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="repeatable; default 100000")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--unit-rows", type=int, default=10_000)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="forwards of at most this many padded tokens within each batch (default: the whole batch)")
    parser.add_argument("--max-length", type=int, default=128, help="prompt tokens (the tiny model is the cost floor)")
    parser.add_argument("--actor-exit-after-batches", type=int, default=40)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction of units committed when the driver dies")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--s3", action="store_true", help="write the output to a moto S3 server started here")
    parser.add_argument("--kill-node", action="store_true",
                        help="a two-node cluster loses its second node for good mid-run, instead of the two kills")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="soak-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    server = start_s3_server(work) if args.s3 else None
    try:
        run = soak_node_kill if args.kill_node else soak
        results = [run(rows, args, work) for rows in args.rows or [100_000]]
    finally:
        if server is not None:
            server.kill()
    columns = ["rows_in", "rows_out", "duplicate_ids", "actor_killed", "driver_killed", "units",
               "units_committed_at_kill", "first_run_s", "resume_run_s", "rows_per_s", "driver_peak_rss_mb",
               "actor_peak_rss_mb"]
    if args.kill_node:
        columns = ["rows_in", "rows_out", "duplicate_ids", "node_killed", "pipelines_reformed", "units",
                   "units_committed_at_kill", "run_s", "after_kill_s", "rows_per_s", "driver_peak_rss_mb"]
    print("  ".join(columns))
    for result in results:
        print("  ".join(str(result[c]) for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
