"""Unsloth vs plain LoRA with the product's finetune job (Ray Train worker, TRL SFTTrainer), same GPU.

    python benchmarks/gpu_finetune_backends.py --data .data/imdb/train.parquet --work /tmp/bench --out $OUT
    # one worker vs two (one GPU each) at the same global batch, on a machine with two GPUs
    python benchmarks/gpu_finetune_backends.py ... --backends hf --workers 1,2 --batch-size 32

Both backends run `configs/finetune/mistral7b_qlora_gpu.yaml` (4-bit QLoRA r=16 on all seven projections,
gradient checkpointing, batch 32, IMDB reviews clipped to 512 tokens) on a random-weight Mistral-7B; only
`model.backend` differs (`unsloth` vs `hf` = transformers + peft + bitsandbytes, sdpa), and hf trains padded
batches where the config asks for padding-free ones (hf cannot keep packed reviews apart). Prints a table of
non-padding tokens/s after the warm-up steps, peak GPU memory, time to the first step, model load time, and
tokens/s as a fraction of the 6·params·tokens floor at the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import bf16_matmul_tflops, build_random_mistral_7b, gpu_name, model_parameters  # noqa: E402
from sentiment_ray.config import FinetuneConfig, load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "mistral7b_qlora_gpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="IMDB train.parquet")
    parser.add_argument("--work", default="/tmp/bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backends", default="unsloth,hf")
    parser.add_argument("--workers", default="1", help="Ray Train worker counts to run, e.g. 1,2 (one GPU each); "
                        "--batch-size is the global batch, split over the workers")
    args = parser.parse_args()

    from sentiment_ray.training.job import run_finetune

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    model_dir = build_random_mistral_7b(work / "mistral7b-random", texts)
    params = model_parameters(model_dir)
    tflops = bf16_matmul_tflops()
    rows = {}
    for backend in args.backends.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            if args.batch_size % workers:
                raise SystemExit(f"--batch-size {args.batch_size} does not split over {workers} workers")
            name = backend if workers == 1 and args.workers == "1" else f"{backend} x{workers}"
            cfg = load_config(FinetuneConfig, CONFIG, [
                f"model.name_or_path={model_dir}", f"model.backend={backend}", f"data.train={args.data}",
                f"data.limit={args.steps * args.batch_size}", f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch_size // workers}", "train.logging_steps=5",
                f"output_dir={work / ('adapter-' + backend + str(workers))}", f"ray.num_workers={workers}",
                "overwrite=true", "ray.address=local", f"ray.storage_path={work / 'ray_results'}",
                "ray.cpus_per_worker=8",
                # hf trains padded: its sdpa attention cannot keep packed reviews apart (config.check_padding_free)
                *(["train.padding_free=false"] if backend == "hf" else []),
            ])
            metrics = run_finetune(cfg)["metrics"]
            metrics["floor_fraction"] = metrics["steady_tokens_per_second"] * 6 * params / (tflops * 1e12)
            rows[name] = metrics
            (out / "finetune_backends.json").write_text(json.dumps(
                {"gpu": gpu_name(), "params": params, "bf16_tflops": tflops, "results": rows}, indent=2))

    print(f"\nGPU {gpu_name()}, {params / 1e9:.2f}e9 params, bf16 matmul {tflops:.0f} TFLOP/s, "
          f"global batch {args.batch_size}, {args.steps} steps ({2} warm-up steps excluded from tokens/s)")
    print(f"{'backend':10}{'tokens/s':>10}{'peak GB':>9}{'1st step s':>11}{'load s':>8}{'floor %':>9}")
    for backend, m in rows.items():
        print(f"{backend:10}{m['steady_tokens_per_second']:>10.0f}{m['peak_gpu_memory_gb']:>9.2f}"
              f"{m['first_step_seconds']:>11.1f}{m['model_load_seconds']:>8.1f}{100 * m['floor_fraction']:>9.2f}")
    for backend in args.backends.split(","):
        if f"{backend} x1" in rows:
            for name, m in rows.items():
                if name.startswith(backend + " x") and name != f"{backend} x1":
                    one = rows[f"{backend} x1"]
                    print(f"{name} / {backend} x1: tokens/s x"
                          f"{m['steady_tokens_per_second'] / one['steady_tokens_per_second']:.2f}")
    if {"unsloth", "hf"} <= rows.keys():
        u, h = rows["unsloth"], rows["hf"]
        print(f"unsloth/hf: tokens/s x{u['steady_tokens_per_second'] / h['steady_tokens_per_second']:.2f}, "
              f"peak memory x{u['peak_gpu_memory_gb'] / h['peak_gpu_memory_gb']:.2f}")


if __name__ == "__main__":
    main()
