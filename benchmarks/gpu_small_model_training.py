"""SmolLM2-135M finetuning speed on one GPU: where a step's time goes, and which settings make an epoch fast.

    python benchmarks/gpu_small_model_training.py --data .data/imdb/train.parquet \
        --random-from .data/smollm2-arch --out $OUT --variants "unsloth-b32:;hf-b32:model.backend=hf"

Each variant is `name:override,override` on top of `configs/finetune/smollm2_gpu.yaml`, run in this process
with the product's own `build_trainer`/`run_training` (the code the Ray Train worker runs) for `--steps` steps
on real IMDB reviews. `--random-from` takes a folder with SmolLM2's config and tokenizer and builds random
weights (speed does not depend on them); `--model` takes a real model folder. `--profile NAME[,NAME]` records a torch
profile of steps 10-14 of that variant. Prints non-padding tokens/s after the warm-up steps, ms per step, peak
memory and the fraction of the 6·params·tokens floor at the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import bf16_matmul_tflops, gpu_name
from sentiment_ray.config import FinetuneConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "smollm2_gpu.yaml"
PROFILED_STEPS = (10, 15)


def build_random_model(arch_dir: Path, out_dir: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "model.safetensors").exists():
        return out_dir
    config = AutoConfig.from_pretrained(arch_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (arch_dir / name).exists():
            shutil.copy(arch_dir / name, out_dir / name)
    del model
    torch.cuda.empty_cache()
    return out_dir


def step_timer_and_profiler(profile_to: Path | None):
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.step_ms: list[float] = []
            self.gap_ms: list[float] = []  # between one step's end and the next one's start: data, logging
            self._begin = self._end = None
            self.profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            import torch

            now = time.perf_counter()
            if self._end is not None:
                self.gap_ms.append(1000 * (now - self._end))
            self._begin = now
            if profile_to is not None and state.global_step == PROFILED_STEPS[0]:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
                self._profile_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            self._end = time.perf_counter()
            self.step_ms.append(1000 * (self._end - self._begin))
            if self.profiler is not None and state.global_step == PROFILED_STEPS[1]:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self._profile_start
                self.profiler.__exit__(None, None, None)
                events = self.profiler.key_averages()
                # Only the device-side events: an aten op's row repeats the time of the kernels it launched
                # (as the profiler's own table totals it; summing every row counted kernel time twice).
                on_device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
                gpu_us = sum(e.self_device_time_total for e in on_device)
                kernels = sum(e.count for e in on_device)
                steps = PROFILED_STEPS[1] - PROFILED_STEPS[0]
                summary = (f"wall {1000 * wall / steps:.1f} ms/step, GPU busy {gpu_us / 1e3 / steps:.1f} ms/step "
                           f"({100 * gpu_us / 1e6 / wall:.0f} %), ~{kernels // steps} GPU ops/step\n")
                profile_to.write_text(
                    summary
                    + events.table(sort_by="self_device_time_total", row_limit=30)
                    + "\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=30))
                print(f"[profile] {summary}", end="", flush=True)
                self.profiler = None

    return StepTimes()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="IMDB train.parquet")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder")
    source.add_argument("--random-from", help="a folder with config.json + tokenizer: random weights")
    parser.add_argument("--variants", required=True, help="'name:key=v,key=v;name2:...'")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", default="", help="variant names to profile, comma-separated")
    parser.add_argument("--work", default="/tmp/bench-small")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from sentiment_ray.training.job import build_trainer, load_training_rows, run_training

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else build_random_model(Path(args.random_from), work / "smollm2-random")
    on_gpu = torch.cuda.is_available()  # the CPU run is only a smoke test of this script
    tflops = bf16_matmul_tflops() if on_gpu else float("nan")
    device = gpu_name() if on_gpu else "cpu"
    rows = {}
    for spec in args.variants.split(";"):
        name, _, overrides = spec.partition(":")
        cfg = load_config(FinetuneConfig, CONFIG, [
            f"model.name_or_path={model_dir}", f"data.train={args.data}", f"train.max_steps={args.steps}",
            f"output_dir={work / name}", "train.logging_steps=10",
            *[o for o in overrides.split(",") if o],
        ])
        rows_needed = args.steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit=rows_needed))
        texts, labels, _ = load_training_rows(cfg)
        timer = step_timer_and_profiler(out / f"profile_{name}.txt" if name in args.profile.split(",") else None)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        setup = build_trainer(cfg, texts, labels, str(work / f"trainer-{name}"), extra_callbacks=(timer,))
        metrics = run_training(setup)
        params = sum(p.numel() for p in setup.trainer.model.parameters())
        metrics.update({
            "variant": name, "overrides": overrides, "wall_seconds": round(time.perf_counter() - started, 1),
            "median_step_ms": round(median(timer.step_ms[2:]), 1), "median_gap_ms": round(median(timer.gap_ms[2:]), 1),
            "params": params,
            "floor_fraction": (metrics["steady_tokens_per_second"] or 0) * 6 * params / (tflops * 1e12),
        })
        rows[name] = metrics
        print(f"[bench] {name}: {json.dumps(metrics)}", flush=True)
        (out / "small_model_training.json").write_text(json.dumps(
            {"gpu": device, "bf16_tflops": tflops, "steps": args.steps, "results": rows}, indent=2))
        del setup
        if on_gpu:
            torch.cuda.empty_cache()

    print(f"\nGPU {device}, bf16 matmul {tflops:.0f} TFLOP/s, {args.steps} steps per variant")
    print(f"{'variant':22}{'tokens/s':>10}{'ms/step':>9}{'gap ms':>8}{'peak GB':>9}{'1st step s':>11}{'floor %':>9}")
    for name, m in rows.items():
        print(f"{name:22}{m['steady_tokens_per_second'] or 0:>10.0f}{m['median_step_ms']:>9.1f}"
              f"{m['median_gap_ms']:>8.1f}{m.get('peak_gpu_memory_gb', 0):>9.2f}"
              f"{m['first_step_seconds'] or 0:>11.1f}{100 * m['floor_fraction']:>9.2f}")


if __name__ == "__main__":
    main()
