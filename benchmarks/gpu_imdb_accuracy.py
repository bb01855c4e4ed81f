"""The accuracy run on IMDB with the product's own commands: finetune, then evaluate on dev and on dev excerpts.

    python benchmarks/gpu_imdb_accuracy.py --data .data/imdb --work /tmp/acc --out $OUT [key=value ...]

Runs, each as its own `sentiment-ray` process (timed, Ray start-up included):
    sentiment-ray finetune --config configs/finetune/smollm2_gpu.yaml --output-dir W/adapter \
        data.train=D/train.parquet ray.address=local ray.cpus_per_worker=8 [key=value ...]
    sentiment-ray excerpts --input D/dev.parquet --output W/dev_excerpts.parquet --seed 0
    sentiment-ray evaluate --config configs/score/smollm2_gpu.yaml --adapter W/adapter --input D/dev.parquet \
        --output W/eval-dev ray.address=local
    sentiment-ray evaluate ... --input W/dev_excerpts.parquet --output W/eval-excerpts
and writes accuracy.json (the adapter's training metrics, both evaluations, each command's seconds) and the
dev reliability diagram to --out. The base model is the embedded SmolLM2-135M-Instruct (its wheel in the cache
named by SENTIMENT_RAY_CACHE, docs/BENCHMARKS.md §7).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sentiment_ray.cli"]


def run(name: str, args: list[str], timings: dict) -> None:
    started = time.perf_counter()
    print(f"[bench] {name}: sentiment-ray {' '.join(args)}", flush=True)
    subprocess.run(CLI + args, check=True, cwd=REPO)
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"[bench] {name}: {timings[name]} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder with IMDB train.parquet and dev.parquet")
    parser.add_argument("--work", default="/tmp/acc")
    parser.add_argument("--out", required=True)
    parser.add_argument("--finetune-config", default="configs/finetune/smollm2_gpu.yaml")
    parser.add_argument("--score-config", default="configs/score/smollm2_gpu.yaml")
    parser.add_argument("--dev-only", action="store_true", help="evaluate on dev only, no excerpt set")
    parser.add_argument("overrides", nargs="*", help="finetune key=value overrides")
    args = parser.parse_args()
    data, work, out = Path(args.data).resolve(), Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    adapter = work / "adapter"
    run("finetune", ["finetune", "--config", args.finetune_config, "--output-dir", str(adapter),
                     f"data.train={data / 'train.parquet'}", "ray.address=local", "ray.cpus_per_worker=8",
                     *args.overrides], timings)
    labeled_sets = [("dev", data / "dev.parquet")]
    if not args.dev_only:
        labeled_sets.append(("dev_excerpts", work / "dev_excerpts.parquet"))
        run("excerpts", ["excerpts", "--input", str(data / "dev.parquet"),
                         "--output", str(work / "dev_excerpts.parquet"), "--seed", "0"], timings)
    evaluations = {}
    for name, labeled in labeled_sets:
        run(f"evaluate_{name}", ["evaluate", "--config", args.score_config, "--adapter", str(adapter),
                                 "--input", str(labeled), "--output", str(work / f"eval-{name}"), "ray.address=local"],
            timings)
        evaluations[name] = json.loads((work / f"eval-{name}" / "metrics.json").read_text())
    metadata = json.loads((adapter / "sentiment_ray.json").read_text())
    report = {"overrides": args.overrides, "seconds": timings, "training": metadata["metrics"],
              "temperature": metadata.get("temperature"), "data": metadata["data"], "evaluations": evaluations}
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    for plot in ("reliability.png",):
        if (work / "eval-dev" / plot).exists():
            shutil.copy(work / "eval-dev" / plot, out / f"dev_{plot}")

    m = metadata["metrics"]
    print(f"\nfinetune: {m.get('num_workers', 1)} worker(s), global batch {m.get('global_batch_size')}, "
          f"{m['steps']} steps, {m['train_seconds']} s in trainer.train(), "
          f"{m['steady_tokens_per_second']} non-padding tokens/s steady, peak {m.get('peak_gpu_memory_gb')} GB, "
          f"temperature {metadata.get('temperature')}")
    print(f"{'set':14}{'rows':>7}{'accuracy':>10}{'precision':>11}{'recall':>8}{'F1':>7}{'ECE':>8}{'Brier':>8}")
    for name, e in evaluations.items():
        print(f"{name:14}{e.get('rows', e.get('n', 0)):>7}{e['accuracy']:>10.4f}{e['precision']:>11.4f}"
              f"{e['recall']:>8.4f}{e['f1']:>7.4f}{e['ece']:>8.4f}{e['brier']:>8.4f}")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
