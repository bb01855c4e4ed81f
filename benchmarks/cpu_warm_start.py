"""A cold and a warm `sentiment-ray score` of the same model on one machine: the compile cache and the timeline.

    python benchmarks/cpu_warm_start.py --work /tmp/warm --rows 2000 --forward compiled_packed --runs 3

The product's own command, run `--runs` times in fresh processes into the same output (`--overwrite`) with one
compile cache folder (`SENTIMENT_RAY_CACHE`), which is empty before the first run: the first run compiles, the
others load the compiled layers from the cache (compile_cache.py). Each run's manifest gives its timeline (seconds
from the command's start) and its scoring actors' load seconds (model load plus the warm-up compile) and cache
status. The tiny random-weight test model on CPU (built in a second) by default; `--model` takes any local model
folder and `--adapter` an adapter of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_inputs(work: Path, rows: int, adapter: str | None, model: str | None) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.model.metadata import AdapterMetadata
    from sentiment_ray.model.prompt import PromptEncoder, PromptSpec
    from sentiment_ray.model.tiny import build_tiny_model, synthetic_reviews

    texts, _ = synthetic_reviews(rows, seed=0)
    inputs = work / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "text": texts}), inputs)
    if adapter:
        return inputs, Path(adapter)
    base = Path(model) if model else build_tiny_model(work / "model")
    folder = work / "adapter"
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(base)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = PromptSpec(max_length=64)
    AdapterMetadata(base_model=str(base), backend="hf", prompt=spec,
                    label_token_ids=list(PromptEncoder(spec, tokenizer).label_token_ids)).write(folder)
    return inputs, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/warm-start")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--forward", default="compiled_packed")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", default="configs/score/tiny_test.yaml")
    parser.add_argument("--model", help="a local model folder (default: the tiny test model)")
    parser.add_argument("--adapter", help="an adapter of --model (default: a random one)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs, adapter = build_inputs(work, args.rows, args.adapter, args.model)
    cache = work / "cache"
    env = {**os.environ, "SENTIMENT_RAY_CACHE": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if cache.exists():
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    runs = []
    for run in range(args.runs):
        command = [sys.executable, "-m", "sentiment_ray.cli", "score", "--config", args.config, "--adapter",
                   str(adapter), "--input", str(inputs), "--output", str(work / "out"), "--overwrite",
                   f"forward={args.forward}", "max_batch_tokens=4096", "model.dtype=float32", "ray.address=local"]
        started = time.perf_counter()
        child = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(child.stderr[-5000:])
        manifest = json.loads((work / "out" / "_sentiment_ray_manifest.json").read_text())
        actors = manifest["score_stage"]["per_actor"]
        runs.append({"seconds": seconds, "timeline": manifest["timeline"],
                     "load_seconds": [a["load_seconds"] for a in actors],
                     "compile_cache": [a["compile_cache"] for a in actors]})
        print(f"[warm-start] run {run + 1}: {seconds:.1f} s, {json.dumps(runs[-1])}", flush=True)
    (work / "cpu_warm_start.json").write_text(json.dumps(runs, indent=2))
    print(f"\n{args.rows} rows, forward {args.forward}, {args.config}")
    print(f"{'run':>4}{'seconds':>9}{'actor load s (max)':>20}{'first batch s':>15}{'committed s':>13}  compile cache")
    for i, r in enumerate(runs, 1):
        print(f"{i:>4}{r['seconds']:>9.1f}{max(r['load_seconds']):>20.1f}{r['timeline']['first_batch']:>15.1f}"
              f"{r['timeline']['committed']:>13.1f}  {r['compile_cache'][0]}")


if __name__ == "__main__":
    main()
