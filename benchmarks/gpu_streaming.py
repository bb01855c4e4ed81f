"""The streaming scoring job on one GPU or more: end-to-end and steady reviews/s, and how busy the GPUs were.

    python benchmarks/gpu_streaming.py --model smollm2 --arch .bench/smollm2-arch --data .data/imdb/dev.parquet \
        --work /tmp/bench --out $OUT --rows 20000 --rows 100000
    python benchmarks/gpu_streaming.py --model mistral7b --data .data/imdb/dev.parquet --work /tmp/bench --out $OUT \
        --rows 1280 --rows 7680 --old-tree .bench/old
    # scale-out on a machine with two GPUs: the same inputs with one actor, then two (one GPU each)
    python benchmarks/gpu_streaming.py --model smollm2 ... --rows 20000 --rows 100000 --pool-size 1 --pool-size 2

The model has random weights (no weights can be downloaded on the GPU machine): SmolLM2-135M's architecture and
tokenizer (`--arch`: config.json + tokenizer files of the embedded model, no weights), or Mistral-7B's exact
architecture with an IMDB-trained BPE (benchmarks/gpu_common.py); a random r=16 adapter on all seven projections,
merged into the bf16 base. The IMDB dev reviews are tiled to each size (fresh ids, 16 files). Each size runs the
product's job (`run_scoring`) end to end; steady = the large job's rows over its scoring actors' seconds inside
their batches minus the CUDA graph captures and compiles made there (the manifest's score_stage): what the stage
does once running, with no compile or capture in it (by the difference of two jobs' seconds, compile and capture did
not cancel when the two sizes paid different amounts of them: 290.5 reviews/s read for the 7B model's 170; that
figure is still reported, as steady_by_difference); steady of the scoring alone = (large - small rows) over the
difference of the seconds from the first scoring batch to the last, which leaves start-up out. Stage busy = the
share of the scoring actor's time, from its first batch to its last, spent inside its batches (the job's manifest,
`score_stage`): how well the read and tokenize stages feed it; each actor's rows and the seconds after the
pipeline's start of its first and last batch (`score_stage.per_actor`): stagger and imbalance. GPU busy = mean of
nvidia-smi's utilization.gpu (share of time a kernel ran) over the large run's middle 80 %. `--old-tree` (a checkout
of the work-unit pipeline, commit db147a8) runs the same sizes with the old job in a subprocess, in the same call,
for a side-by-side figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
PROMPT = {"max_length": 384}  # configs/finetune/smollm2_gpu.yaml's prompt budget


class GpuSampler:
    """nvidia-smi utilization.gpu every 0.5 s, with timestamps."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []  # (time, GPU index, utilization %)
        self._process = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._process.stdout:
            try:
                index, utilization = line.split(",")[:2]
                self.samples.append((time.perf_counter(), int(index), float(utilization)))
            except ValueError:
                continue

    def busy(self, start: float, stop: float) -> float | None:
        """Mean utilization from the first to the last sample of the run with a kernel running: the steady
        state, without the start-up before the first batch reaches the GPU. Averaged over the GPUs that ran a
        kernel in the run (one per scoring actor)."""
        means = []
        for gpu in sorted({g for _, g, _ in self.samples}):
            run = [u for t, g, u in self.samples if g == gpu and start <= t <= stop]
            active = [i for i, u in enumerate(run) if u > 0]
            if active:
                window = run[active[0]:active[-1] + 1]
                means.append(sum(window) / len(window) / 100)
        return sum(means) / len(means) if means else None

    def close(self):
        self._process.kill()


def tile(data: str, rows: int, folder: Path) -> Path:
    table = pq.read_table(data, columns=["id", "text"])
    copies = -(-rows // table.num_rows)
    table = pa.concat_tables([table.set_column(0, "id", pa.array([f"{c}-{i}" for i in table.column("id").to_pylist()]))
                              for c in range(copies)]).slice(0, rows)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // 16)
    for part in range(16):
        pq.write_table(table.slice(part * per_file, per_file), folder / f"part-{part:02d}.parquet", row_group_size=5000)
    return folder


def build_random_smollm2(arch: Path, out_dir: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "model.safetensors").exists():
        return out_dir
    config = AutoConfig.from_pretrained(arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in arch.iterdir():
        if f.name != "config.json" and f.is_file() and not (out_dir / f.name).exists():
            shutil.copy(f, out_dir / f.name)
    del model
    torch.cuda.empty_cache()
    return out_dir


def make_adapter(model_dir: Path, folder: Path, model: str) -> Path:
    from benchmarks import gpu_scoring

    if model == "smollm2":  # the 7B keeps the 512-token budget of the earlier 7B figures
        gpu_scoring.SPEC.update(PROMPT)
    return gpu_scoring.make_adapter(model_dir, folder)


def build_model_and_adapter(model: str, arch: str | None, data: str, work: Path) -> tuple[Path, Path]:
    """The random-weight model the GPU benchmarks score (SmolLM2 from `arch`'s config, or the 7B architecture with
    a tokenizer trained on `data`'s texts) and a random r=16 adapter of it, under `work`."""
    if model == "smollm2":
        model_dir = build_random_smollm2(Path(arch), work / "smollm2-random")
    else:
        from benchmarks.gpu_common import build_random_mistral_7b

        texts = pq.read_table(data, columns=["text"]).column("text").to_pylist()
        model_dir = build_random_mistral_7b(work / "mistral7b-random", texts)
    return model_dir, make_adapter(model_dir, work / f"adapter-{model}", model)


def run_job(adapter: Path, inputs: Path, output: Path, batch_size: int, max_batch_tokens: int,
            forward: str = "eager", pool_size: int = 1) -> dict:
    from sentiment_ray.config import RayConfig, ScoreConfig, ScoringModelConfig
    from sentiment_ray.ops.ray_cluster import ensure_ray
    from sentiment_ray.scoring import run_scoring

    ensure_ray(RayConfig(address="local"))
    cfg = ScoreConfig(input=str(inputs), output=str(output), adapter=str(adapter), overwrite=True,
                      batch_size=batch_size, max_batch_tokens=max_batch_tokens, pool_size=pool_size,
                      num_cpus_per_actor=2, num_gpus_per_actor=1, batches_in_flight=4, forward=forward,
                      model=ScoringModelConfig(backend="hf", dtype="bfloat16", merge_adapter=True))
    started = time.perf_counter()
    summary = run_scoring(cfg)
    return {"rows": summary.rows_out, "seconds": time.perf_counter() - started, "started": started,
            "job_seconds": summary.seconds, "score_stage": dataclasses.asdict(summary.score_stage),
            "reviews_per_second": summary.rows_out / (time.perf_counter() - started)}


OLD_JOB = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from sentiment_ray.config import RayConfig, ScoreConfig, ScoringModelConfig
from sentiment_ray.ops.ray_cluster import ensure_ray
from sentiment_ray.scoring import run_scoring
ensure_ray(RayConfig(address="local"))
out = {}
for inputs in sys.argv[3:]:
    cfg = ScoreConfig(input=inputs, output=inputs + "-old-out", adapter=sys.argv[2], overwrite=True, batch_size=256,
                      max_batch_tokens=32768, pool_size=1, num_cpus_per_actor=4, num_gpus_per_actor=1,
                      model=ScoringModelConfig(backend="hf", dtype="bfloat16", merge_adapter=True))
    started = time.perf_counter()
    summary = run_scoring(cfg)
    out[inputs] = {"rows": summary["rows_out"], "seconds": time.perf_counter() - started}
print("OLD-RESULT " + json.dumps(out))
"""


def scoring_span(run: dict) -> float:
    """Seconds from the first scoring batch's start to the last one's end, over all actors."""
    actors = run["score_stage"]["per_actor"]
    return max(a["last_batch_offset"] for a in actors) - min(a["first_batch_offset"] for a in actors)


def scoring_steady(small: dict, large: dict) -> float:
    """Steady reviews/s of the scoring itself: the extra rows over the extra seconds from first to last scoring
    batch. Unlike `steady` (the jobs' whole seconds) it leaves out the start-up before the first batch (Ray, model
    load), which varied by up to 6 s between two jobs of one call (docs/BENCHMARKS.md §16): at 7B speeds that
    moved `steady` by 30 %. Both spans hold the actor's compile, so it cancels as in `steady`."""
    return (large["rows"] - small["rows"]) / (scoring_span(large) - scoring_span(small))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "mistral7b"), required=True)
    parser.add_argument("--arch", help="SmolLM2: a folder with its config.json and tokenizer files")
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, action="append", required=True, help="two sizes: small, large")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=131072)
    parser.add_argument("--old-tree", help="a checkout of the work-unit pipeline to run side by side")
    parser.add_argument("--forward", default="eager",
                        help="ScoreConfig.forward (sentiment_ray.config.FORWARD_MODES)")
    parser.add_argument("--warmup-rows", type=int, default=0,
                        help="a job of this many rows before the timed ones (per pool size), reported apart: with "
                             "forward compiled both timed jobs then find inductor's compile cache warm")
    parser.add_argument("--pool-size", type=int, action="append",
                        help="scoring actors, one GPU each; repeat to run each pool size over the same inputs (1)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_common import gpu_name

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, adapter = build_model_and_adapter(args.model, args.arch, args.data, work)
    report = {"gpu": gpu_name(), "model": args.model, "batch_size": args.batch_size,
              "max_batch_tokens": args.max_batch_tokens, "forward": args.forward,
              "new": {}, "old": {}}
    sizes = sorted(args.rows)
    inputs = {n: tile(args.data, n, work / f"in-{n}") for n in sorted({*sizes, args.warmup_rows} - {0})}
    pools = args.pool_size or [1]
    report["pools"] = {}
    sampler = GpuSampler()
    try:
        for pool in pools:
            runs = report["pools"].setdefault(pool, {"runs": {}})["runs"]
            if args.warmup_rows:
                warmup = run_job(adapter, inputs[args.warmup_rows], work / f"out-{args.model}-warmup", args.batch_size,
                                 args.max_batch_tokens, args.forward, pool)
                report["pools"][pool]["warmup"] = warmup
                print(f"[bench] {pool} actor(s), warm-up {warmup['rows']} rows: {warmup['seconds']:.1f} s, compile/"
                      f"capture {warmup['score_stage']['capture_seconds']:.1f} s", flush=True)
            for n in sizes:
                result = run_job(adapter, inputs[n], work / f"out-{args.model}-{n}", args.batch_size,
                                 args.max_batch_tokens, args.forward, pool)
                result["gpu_busy"] = sampler.busy(result["started"], result["started"] + result["seconds"])
                runs[n] = result
                (out / f"gpu_streaming_{args.model}.json").write_text(json.dumps(report, indent=2))
                print(f"[bench] {pool} actor(s), {n} rows: {result['seconds']:.1f} s, busy {result['gpu_busy']}, "
                      f"compile/capture {result['score_stage']['capture_seconds']:.1f} s", flush=True)
            small, large = runs[sizes[0]], runs[sizes[-1]]
            stage = large["score_stage"]
            report["pools"][pool]["steady"] = large["rows"] / (stage["busy_seconds"] - stage["capture_seconds"])
            report["pools"][pool]["steady_by_difference"] = ((large["rows"] - small["rows"])
                                                             / (large["seconds"] - small["seconds"]))
            report["pools"][pool]["steady_scoring"] = scoring_steady(small, large)
    finally:
        sampler.close()
    report["new"] = report["pools"][pools[0]]["runs"]
    report["new_steady"] = report["pools"][pools[0]]["steady"]
    if args.old_tree:
        import ray

        ray.shutdown()
        import os

        old_tree = str(Path(args.old_tree).resolve())  # first on the path of the driver and of its Ray workers
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([old_tree, os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, "-c", OLD_JOB, old_tree, str(adapter),
                                *[str(inputs[n]) for n in sizes]],
                               capture_output=True, text=True, env=env, cwd=old_tree)  # Ray puts the cwd first
        line = [ln for ln in child.stdout.splitlines() if ln.startswith("OLD-RESULT ")]
        if not line:
            print(child.stdout[-3000:], child.stderr[-5000:])
        else:
            old = json.loads(line[0][len("OLD-RESULT "):])
            report["old"] = {n: old[str(inputs[n])] for n in sizes}
            o_small, o_large = report["old"][sizes[0]], report["old"][sizes[-1]]
            report["old_steady"] = (o_large["rows"] - o_small["rows"]) / (o_large["seconds"] - o_small["seconds"])
    (out / f"gpu_streaming_{args.model}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['gpu']}, {args.model} (random weights, r=16 adapter merged, bf16), IMDB dev reviews tiled, "
          f"batch {args.batch_size}, forwards of <= {args.max_batch_tokens} tokens, forward {args.forward}")
    print(f"{'pipeline':12}{'actors':>7}{'rows':>9}{'seconds':>9}{'reviews/s end to end':>22}{'GPU busy':>10}"
          f"{'stage busy':>12}")
    rows = [("new", pool, r) for pool in pools for r in report["pools"][pool]["runs"].values()]
    rows += [("old", 1, r) for r in report["old"].values()]
    for name, pool, r in rows:
        busy = r.get("gpu_busy")
        stage = (r.get("score_stage") or {}).get("busy_fraction")
        print(f"{name:12}{pool:>7}{r['rows']:>9}{r['seconds']:>9.1f}{r['rows'] / r['seconds']:>22.1f}"
              f"{'' if busy is None else f'{busy:.0%}':>10}{'' if stage is None else f'{stage:.0%}':>12}")
    for name, pool, r in rows:
        for actor in (r.get("score_stage") or {}).get("per_actor") or ():
            print(f"  {name} {pool} actor(s), {r['rows']} rows: actor {actor['actor']} scored {actor['rows']} rows, "
                  f"batches from {actor['first_batch_offset']:.1f} s to {actor['last_batch_offset']:.1f} s")
    for pool in pools:
        steady = report["pools"][pool]["steady"]
        print(f"steady reviews/s, {pool} actor(s): {steady:.1f}"
              + (f" ({steady / report['new_steady']:.2f}x {pools[0]})" if pool != pools[0] else "")
              + f"; of the scoring alone (first to last batch): {report['pools'][pool]['steady_scoring']:.1f}")
    if "old_steady" in report:
        print(f"steady reviews/s, old pipeline: {report['old_steady']:.1f}")


if __name__ == "__main__":
    main()
