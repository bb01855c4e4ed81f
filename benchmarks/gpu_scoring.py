"""Scoring throughput on one GPU, 7B architecture, real IMDB dev reviews: bare loop and the Ray Data job.

    python benchmarks/gpu_scoring.py --data .data/imdb/dev.parquet --work /tmp/bench --out $OUT

Two ways to serve base + adapter, each measured by the in-process loop in its own process (Unsloth patches
transformers on import, so the variants must not share one):
  unsloth-4bit   Unsloth FastLanguageModel, 4-bit base + LoRA adapter
  hf-bf16-merged transformers bf16 base with the adapter merged (peft merge_and_unload)
Each Ray Data batch of `--batch-size` rows is sorted by length and cut into forwards of at most
`--max-batch-tokens` padded tokens (0: one forward per batch, padded to its longest review). Then the
product's scoring job (Ray Data, one GPU actor) with the faster one, at two input sizes: end-to-end
reviews/s as a user sees it, and the steady state from the difference of the two runs (start-up cancels).
Prints reviews/s beside the FLOP floor: 2 x params x real prompt tokens at the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "unsloth-4bit": {"backend": "unsloth", "dtype": "bfloat16", "load_in_4bit": True, "merge_adapter": False},
    "hf-bf16-merged": {"backend": "hf", "dtype": "bfloat16", "load_in_4bit": False, "merge_adapter": True},
}
SPEC = {"max_length": 512}


def make_adapter(model_dir: Path, folder: Path) -> Path:
    """A random-valued r=16 adapter on all seven projections, saved as `finetune` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.model.metadata import AdapterMetadata
    from sentiment_ray.model.prompt import PromptEncoder, PromptSpec

    if (folder / "sentiment_ray.json").exists():
        return folder
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = PromptSpec(**SPEC)
    AdapterMetadata(base_model=str(model_dir), backend="hf", prompt=spec,
                    label_token_ids=list(PromptEncoder(spec, tokenizer).label_token_ids)).write(folder)
    del model, base
    torch.cuda.empty_cache()
    return folder


def bare_loop(variant: str, adapter: Path, data: str, batch_size: int, max_batch_tokens: int | None) -> dict:
    """Runs in a fresh process: load, warm up, then time scoring every review in batches."""
    if VARIANTS[variant]["backend"] == "unsloth":
        import unsloth  # noqa: F401  (first, so it patches transformers)
    import torch

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.scorer import SentimentScorer

    texts = pq.read_table(data, columns=["text"]).column("text").to_pylist()
    started = time.perf_counter()
    scorer = SentimentScorer.from_adapter(adapter, ScoringModelConfig(**VARIANTS[variant]), max_batch_tokens)
    load = time.perf_counter() - started
    scorer.score_texts(texts[:batch_size])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        scorer.score_texts(texts[start:start + batch_size])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    prompts = scorer.encoder.encode_prompts(scorer.encoder.clean_texts(texts))
    return {"rows": len(texts), "seconds": seconds, "reviews_per_second": len(texts) / seconds,
            "load_seconds": load, "prompt_tokens": sum(len(p.input_ids) for p in prompts),
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def ray_job(variant: str, adapter: Path, data: str, rows: int, work: Path, batch_size: int,
            max_batch_tokens: int | None, pool_size: int = 1) -> dict:
    import pyarrow as pa

    from sentiment_ray.config import RayConfig, ScoreConfig, ScoringModelConfig
    from sentiment_ray.ops.ray_cluster import ensure_ray
    from sentiment_ray.scoring import run_scoring

    table = pq.read_table(data)
    copies = -(-rows // table.num_rows)  # tile the reviews, with fresh ids, when more rows are asked for
    table = pa.concat_tables([table.set_column(0, "id", pa.array([f"{c}-{i}" for i in table.column("id").to_pylist()]))
                              for c in range(copies)]).slice(0, rows)
    inputs = work / f"ray-in-{rows}"
    inputs.mkdir(exist_ok=True)
    per_file = -(-rows // 8)
    for part in range(8):
        pq.write_table(table.slice(part * per_file, per_file), inputs / f"part-{part}.parquet")
    ensure_ray(RayConfig(address="local"))
    cfg = ScoreConfig(input=str(inputs), output=str(work / f"ray-out-{variant}-{rows}-{pool_size}"),
                      adapter=str(adapter),
                      overwrite=True, batch_size=batch_size, max_batch_tokens=max_batch_tokens, pool_size=pool_size,
                      num_cpus_per_actor=4,
                      num_gpus_per_actor=1, model=ScoringModelConfig(**VARIANTS[variant]))
    summary = run_scoring(cfg)
    return {"rows": summary.rows_out, "seconds": summary.seconds, "reviews_per_second": summary.rows_per_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="IMDB dev.parquet")
    parser.add_argument("--work", default="/tmp/bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per Ray Data batch")
    parser.add_argument("--max-batch-tokens", type=int, default=32768, help="0: one forward per batch")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bare-only", metavar="VARIANT", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    adapter = work / "adapter-random-7b"

    if args.bare_only:
        print(json.dumps(bare_loop(args.bare_only, adapter, args.data, args.batch_size, args.max_batch_tokens or None)))
        return

    from benchmarks.gpu_common import bf16_matmul_tflops, build_random_mistral_7b, gpu_name, model_parameters

    work.mkdir(parents=True, exist_ok=True)
    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    model_dir = build_random_mistral_7b(work / "mistral7b-random", texts)
    make_adapter(model_dir, adapter)
    params, tflops = model_parameters(model_dir), bf16_matmul_tflops()
    report = {"gpu": gpu_name(), "params": params, "bf16_tflops": tflops, "bare": {}, "ray": {}}
    for variant in args.variants.split(","):
        child = subprocess.run([sys.executable, __file__, "--data", args.data, "--work", str(work), "--out", str(out),
                                "--batch-size", str(args.batch_size), "--max-batch-tokens", str(args.max_batch_tokens),
                                "--bare-only", variant],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stdout[-3000:], child.stderr[-6000:])
            raise SystemExit(f"bare loop {variant} failed")
        report["bare"][variant] = json.loads(child.stdout.strip().splitlines()[-1])
        (out / "gpu_scoring.json").write_text(json.dumps(report, indent=2))
    bare = report["bare"]
    best = max(bare, key=lambda v: bare[v]["reviews_per_second"])
    tokens_per_review = bare[best]["prompt_tokens"] / bare[best]["rows"]
    floor = tflops * 1e12 / (2 * params * tokens_per_review)
    small, full = len(texts) // 4, len(texts)
    for rows in (small, full):
        report["ray"][rows] = ray_job(best, adapter, args.data, rows, work, args.batch_size,
                                      args.max_batch_tokens or None)
        (out / "gpu_scoring.json").write_text(json.dumps(report, indent=2))
    ray_small, ray_full = report["ray"][small], report["ray"][full]
    steady = (ray_full["rows"] - ray_small["rows"]) / (ray_full["seconds"] - ray_small["seconds"])
    report.update(best=best, floor_reviews_per_second=floor, ray_steady_reviews_per_second=steady,
                  tokens_per_review=tokens_per_review)
    (out / "gpu_scoring.json").write_text(json.dumps(report, indent=2))

    print(f"\nGPU {report['gpu']}, {params / 1e9:.2f}e9 params, bf16 matmul {tflops:.0f} TFLOP/s, "
          f"batch {args.batch_size} rows, forwards of <= {args.max_batch_tokens or 'all'} tokens, "
          f"{len(texts)} IMDB dev reviews, {tokens_per_review:.0f} prompt tokens/review (max 512)")
    print(f"{'path':40}{'reviews/s':>10}{'of floor':>10}{'peak GB':>9}")
    for variant, r in bare.items():
        print(f"{'bare loop, ' + variant:40}{r['reviews_per_second']:>10.1f}{r['reviews_per_second'] / floor:>10.1%}"
              f"{r['peak_gpu_memory_gb']:>9.1f}")
    print(f"{'Ray Data job, ' + best + ', steady':40}{steady:>10.1f}{steady / floor:>10.1%}")
    print(f"{'Ray Data job, ' + best + ', end to end':40}{ray_full['reviews_per_second']:>10.1f}"
          f"{ray_full['reviews_per_second'] / floor:>10.1%}   ({ray_full['rows']} rows, {ray_full['seconds']:.0f} s)")
    print(f"FLOP floor {floor:.0f} reviews/s")


if __name__ == "__main__":
    main()
