"""`sentiment-ray score` with a shipped GPU config beside the peer a user would pick: `sentiment-ray export` and
transformers' `pipeline("text-classification")`, on the same reviews, the same GPU, in one call.

    python benchmarks/gpu_peer.py --model smollm2 --arch .bench/smollm2-arch --data .data/imdb/dev.parquet \
        --work /tmp/peer --out $OUT --rows 25000 --rows 100000 --pipeline-rows 25000
    python benchmarks/gpu_peer.py --model mistral7b --data .data/imdb/dev.parquet --work /tmp/peer7 --out $OUT \
        --config configs/score/mistral7b_gpu.yaml --rows 3840 --pipeline-rows 0

Each side runs as a user runs it: a fresh process (`python -m sentiment_ray.cli score --config ...`; a script that
builds the pipeline from the exported folder), timed from its start to its end. The model has random weights (no
weights reach the GPU machine; gpu_streaming.py builds them); a random r=16 adapter, as in the other benchmarks.

Reported per run:
- end to end: rows over the process's seconds (Python start-up, Ray, model load, compile, scoring, commit, exit);
- steady (busy minus capture): rows over the scoring actors' seconds inside their batches minus the CUDA graph
  captures and compiles made there (the manifest's score_stage), i.e. what the stage does once running;
- steady (span): rows over the seconds from the first scoring batch's start to the last one's end;
- the manifest's timeline (Ray ready, pipeline started, first actor ready, first batch, last batch, committed);
- the pipeline's steady rate: rows after its first batch over the seconds after it.
The first `score` job of a call finds the compile cache cold; the ones after it warm (the job's log says which).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PIPELINE_SCRIPT = r"""
import json, sys, time
started = time.time()
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, pipeline
folder, inputs, batch_size, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
template = AutoConfig.from_pretrained(folder).sentiment_ray_prompt_template
texts = [template.format(text=t) for t in pq.read_table(inputs, columns=["text"]).column("text").to_pylist()]
pipe = pipeline("text-classification", model=folder, device=0, dtype=torch.bfloat16)
loaded = time.time()
first_batch = None
labels = []
# a generator, not the list: given a list the pipeline returns only when every row is done, and the first-batch
# mark below would be taken at the end
for i, out in enumerate(pipe((t for t in texts), batch_size=batch_size, truncation=True, max_length=max_length)):
    labels.append(out["label"])
    if i == batch_size - 1:
        torch.cuda.synchronize()
        first_batch = time.time()
torch.cuda.synchronize()
ended = time.time()
print("PIPELINE-RESULT " + json.dumps({"rows": len(labels), "load_seconds": loaded - started,
      "first_batch": first_batch - started, "seconds_in_process": ended - started,
      "steady": (len(labels) - batch_size) / (ended - first_batch)}))
"""


def run_score(config: str, adapter: Path, inputs: Path, output: Path, overrides: list[str],
              log_file: Path | None = None) -> dict:
    command = [sys.executable, "-m", "sentiment_ray.cli", "score", "--config", config, "--adapter", str(adapter),
               "--input", str(inputs), "--output", str(output), "--overwrite", *overrides]
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if log_file is not None:  # the whole job log, for profiling where its seconds went
        log_file.write_text(child.stderr)
    if child.returncode != 0:
        print(child.stdout[-3000:], child.stderr[-8000:])
        raise SystemExit(f"score failed: {command}")
    manifest = json.loads((output / "_sentiment_ray_manifest.json").read_text())
    stage = manifest["score_stage"]
    rows = manifest["rows_out"]
    timeline = manifest["timeline"]
    span = timeline["last_batch"] - timeline["first_batch"]
    log = [line for line in child.stderr.splitlines()
           if any(k in line for k in ("loaded on", "compiled", "cannot run here", "timeline", "score stage"))]
    return {"rows": rows, "seconds": seconds, "end_to_end": rows / seconds,
            "steady_busy_minus_capture": rows / (stage["busy_seconds"] - stage["capture_seconds"]),
            "steady_span": rows / span, "busy_fraction": stage["busy_fraction"],
            "capture_seconds": stage["capture_seconds"], "per_actor": stage["per_actor"], "timeline": timeline,
            "log": log[-12:]}


def run_pipeline(folder: Path, inputs: Path, batch_size: int, max_length: int) -> dict:
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(folder), str(inputs), str(batch_size),
                            str(max_length)], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    line = [ln for ln in child.stdout.splitlines() if ln.startswith("PIPELINE-RESULT ")]
    if not line:
        print(child.stdout[-3000:], child.stderr[-8000:])
        raise SystemExit("the pipeline failed")
    result = json.loads(line[0][len("PIPELINE-RESULT "):])
    return {**result, "seconds": seconds, "end_to_end": result["rows"] / seconds, "batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "mistral7b"), required=True)
    parser.add_argument("--arch", help="SmolLM2: a folder with its config.json and tokenizer files")
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/peer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="configs/score/smollm2_gpu.yaml")
    parser.add_argument("--rows", type=int, action="append", required=True,
                        help="input sizes for `score`, run in this order (the first also warms the compile cache)")
    parser.add_argument("--pipeline-rows", type=int, action="append", default=[],
                        help="input sizes for the transformers pipeline (0: none)")
    parser.add_argument("--pipeline-batch", type=int, action="append", help="pipeline batch sizes (64, 256)")
    parser.add_argument("--override", action="append", default=[], help="extra `section.key=value` for score")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_common import gpu_name
    from benchmarks.gpu_streaming import PROMPT, build_model_and_adapter, tile

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    model_dir, adapter = build_model_and_adapter(args.model, args.arch, args.data, work)
    overrides = [f"model.name_or_path={model_dir}", *args.override]
    report = {"gpu": gpu_name(), "model": args.model, "config": args.config, "overrides": overrides, "score": [],
              "pipeline": []}
    pipeline_rows = [n for n in args.pipeline_rows if n]
    inputs = {n: tile(args.data, n, work / f"in-{n}") for n in {*args.rows, *pipeline_rows}}
    for i, n in enumerate(args.rows):
        result = run_score(args.config, adapter, inputs[n], work / f"out-{n}", overrides,
                           log_file=out / f"score-{i}-{n}.log")
        report["score"].append(result)
        print(f"[peer] score {n} rows: {result['seconds']:.1f} s, {result['end_to_end']:.1f} rows/s end to end, "
              f"steady {result['steady_busy_minus_capture']:.1f} (busy-capture) / {result['steady_span']:.1f} (span); "
              f"timeline {result['timeline']}", flush=True)
        (out / f"gpu_peer_{args.model}.json").write_text(json.dumps(report, indent=2))
    if pipeline_rows:
        exported = work / f"exported-{args.model}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sentiment_ray.cli", "export", "--adapter", str(adapter), "--output",
                        str(exported), "--dtype", "bfloat16", "--base-model", str(model_dir)],
                       check=True, cwd=REPO, capture_output=True)
        report["export_seconds"] = time.perf_counter() - started
        max_length = PROMPT["max_length"] if args.model == "smollm2" else 512
        for n in pipeline_rows:
            for batch in args.pipeline_batch or [64, 256]:
                result = run_pipeline(exported, inputs[n], batch, max_length)
                report["pipeline"].append(result)
                print(f"[peer] pipeline {n} rows, batch {batch}: {result['seconds']:.1f} s, "
                      f"{result['end_to_end']:.1f} rows/s end to end, steady {result['steady']:.1f}", flush=True)
                (out / f"gpu_peer_{args.model}.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['gpu']}, {args.model} (random weights, r=16 adapter), {args.config}")
    print(f"{'engine':42}{'rows':>8}{'seconds':>9}{'end to end':>12}{'steady':>10}{'first batch':>13}")
    for r in report["score"]:
        print(f"{'sentiment-ray score':42}{r['rows']:>8}{r['seconds']:>9.1f}{r['end_to_end']:>12.1f}"
              f"{r['steady_busy_minus_capture']:>10.1f}{r['timeline']['first_batch']:>13.1f}")
    for r in report["pipeline"]:
        name = f"export + pipeline, batch {r['batch_size']}"
        print(f"{name:42}{r['rows']:>8}{r['seconds']:>9.1f}{r['end_to_end']:>12.1f}{r['steady']:>10.1f}"
              f"{r['first_batch']:>13.1f}")


if __name__ == "__main__":
    main()
