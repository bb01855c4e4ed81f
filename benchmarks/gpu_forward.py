"""The scoring forward alone on one GPU: eager, static shapes, CUDA graphs, compiled.

    python benchmarks/gpu_forward.py --model smollm2 --arch .bench/smollm2-arch --data .data/imdb/dev.parquet \
        --work /tmp/bench --out $OUT
    python benchmarks/gpu_forward.py --model mistral7b --data .data/imdb/dev.parquet --work /tmp/bench --out $OUT \
        --rows 1280 --batch-size 256 --max-batch-tokens 32768

A bare loop over token ids prepared once on the CPU (the product's TextPreparer), so only the GPU stage's own
work is timed: `SentimentScorer.score_token_ids` on Ray Data-sized batches, models with random weights as in
gpu_streaming.py (adapter merged, bf16). Variants, all in one process, each timed three times after a warm-up
batch (median; CUDA graphs of shapes first seen in the timed runs are captured there, and their capture time is
reported):
  masked         the forward of before: attention mask passed, one host sync per forward group
  unmasked       `forward: eager`: no mask (right padding under causal attention needs none), one sync a batch
  static_shapes  `forward: static_shapes`: forwards padded to fixed shapes (forward_shapes.py), not captured
  cuda_graphs    `forward: cuda_graphs`: the static shapes replayed from captured CUDA graphs
  compiled       `forward: compiled`: the eager groups with each decoder layer under torch.compile (one dynamic
                 graph shared by all layers, compiled_forward.py); its compile seconds are reported, in the warm-up
  compiled_graphs  `forward: compiled_graphs`: the static shapes through the compiled layers, each shape replayed
                 from a captured CUDA graph (compile and captures reported together as capture seconds)
  packed         `forward: packed`: no padding, the prompts of a forward end to end in one row through the
                 varlen flash kernel, the last layer's MLP on the last tokens only (packed_forward.py)
  compiled_packed  `forward: compiled_packed`: packed, through the compiled layers
  compiled_decoder  unmasked, the whole decoder under torch.compile(dynamic=True) (§8's try): compile time apart
  liger+X        variant X after Liger's fused RMSNorm, RoPE and SwiGLU kernels are patched in (needs
                 `pip install liger-kernel`; patches the model for good, so liger variants come last)
`cuda_graphs@W/R` sets the shape steps (width W tokens, R rows; default 64/32). The largest score difference
from the first variant is reported for each (the scores must agree within 1e-3). `--profile V[,V]` records a torch
profile of one more pass of those variants over the first `--profile-batches` batches and prints where the GPU's
time went: matmuls, attention, Triton (compiled fusions), other kernels, and idle (wall time no kernel covered).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def masked_scores(scorer, prompts: list[list[int]]) -> list[float]:
    """The forward as it was: attention mask, a copy to the host after every forward group."""
    import torch

    scores = [0.0] * len(prompts)
    for group in scorer.forward_groups([len(p) for p in prompts]):
        rows = [prompts[j] for j in group]
        lengths = np.array([len(p) for p in rows])
        width = int(lengths.max())
        real = np.arange(width)[None, :] < lengths[:, None]
        padded = np.full((len(rows), width), scorer.pad_id, dtype=np.int64)
        padded[real] = np.concatenate([np.asarray(p, dtype=np.int64) for p in rows])
        with torch.inference_mode():
            hidden = scorer._decoder(input_ids=torch.from_numpy(padded).to(scorer.device),
                                     attention_mask=torch.from_numpy(real.astype(np.int64)).to(scorer.device),
                                     use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(rows), device=scorer.device),
                          torch.from_numpy(lengths).to(scorer.device) - 1]
            logits = (last.to(scorer._label_weight.dtype) @ scorer._label_weight.t()).float()
            positive = torch.softmax(logits, -1)[:, 1].cpu().numpy()
        for j, p in zip(group, positive):
            scores[j] = float(p)
    return scores


def set_forward(scorer, mode: str, steps: str = "") -> None:
    """Switch a loaded scorer's forward mode in place (one model load for every variant)."""
    from sentiment_ray.model.forwards.shapes import ShapeBuckets

    width_step, row_step = (int(x) for x in steps.split("/")) if steps else (64, 32)
    scorer.use_forward(mode, ShapeBuckets(scorer.max_batch_tokens, width_step, row_step))


def time_variant(score, batches: list[list[list[int]]]) -> tuple[float, list[float]]:
    import torch

    score(batches[0])  # warm-up (and, compiled, the first compile)
    torch.cuda.synchronize()
    runs, scores = [], []
    for _ in range(3):
        started = time.perf_counter()
        scores = [s for batch in batches for s in score(batch)]
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), scores


# First match wins: flash attention's kernels are built from CUTLASS templates, so attention is looked for first.
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
                ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "cublas")), ("triton", ("triton",)))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def profile_variant(score, batches, out_file: Path) -> dict:
    """GPU time per kernel kind over one pass of `batches`, and the share of the wall time no kernel covered."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for batch in batches:
            score(batch)
        torch.cuda.synchronize()
        wall_us = 1e6 * (time.perf_counter() - started)
    events = profiler.key_averages()
    # Device-side rows only: an aten op's row repeats its kernels' time (summing all rows counts it twice).
    on_device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    by_kind: dict[str, float] = {}
    for event in on_device:
        kind = kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_device_time_total
    busy_us = sum(by_kind.values())
    summary = {kind: us / wall_us for kind, us in sorted(by_kind.items())}
    summary["idle"] = max(0.0, 1 - busy_us / wall_us)
    summary["wall_s"] = wall_us / 1e6
    out_file.write_text(json.dumps(summary, indent=2) + "\n\n"
                        + events.table(sort_by="self_device_time_total", row_limit=40))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "mistral7b"), required=True)
    parser.add_argument("--arch")
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=131072)
    parser.add_argument("--variants", default="unmasked,static_shapes,cuda_graphs")
    parser.add_argument("--profile", default="", help="variants to profile, comma-separated")
    parser.add_argument("--profile-batches", type=int, default=2)
    args = parser.parse_args()
    import torch

    from benchmarks.gpu_common import build_random_mistral_7b, gpu_name
    from benchmarks.gpu_streaming import build_random_smollm2, make_adapter
    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.scorer import SentimentScorer

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    if args.model == "smollm2":
        model_dir = build_random_smollm2(Path(args.arch), work / "smollm2-random")
    else:
        model_dir = build_random_mistral_7b(work / "mistral7b-random", texts)
    adapter = make_adapter(model_dir, work / f"adapter-{args.model}", args.model)
    started = time.perf_counter()
    scorer = SentimentScorer.from_adapter(adapter,
                                          ScoringModelConfig(backend="hf", dtype="bfloat16", merge_adapter=True),
                                          args.max_batch_tokens)
    load_s = time.perf_counter() - started
    prepared = scorer.preparer.prepare((texts * (-(-args.rows // len(texts))))[:args.rows])
    prompts = [p for p in prepared.input_ids if p is not None]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    tokens = sum(len(p) for p in prompts)
    report = {"gpu": gpu_name(), "model": args.model, "rows": len(prompts), "tokens": tokens, "load_s": load_s,
              "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "variants": {}}
    reference = None
    eager_decoder = scorer._decoder
    liger_applied = False
    for variant in args.variants.split(","):
        scorer._decoder = eager_decoder
        mode, _, steps = variant.removeprefix("liger+").partition("@")
        if variant.startswith("liger+") and not liger_applied:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=scorer.model, rope=True, rms_norm=True, swiglu=True,
                                            cross_entropy=False, fused_linear_cross_entropy=False)
            liger_applied = True
        set_forward(scorer, "eager" if mode in ("unmasked", "compiled_decoder", "masked") else mode, steps)
        compile_s = None
        if mode == "masked":
            score = lambda batch: masked_scores(scorer, batch)  # noqa: E731
        else:
            score = scorer.score_token_ids
            if mode == "compiled_decoder":
                scorer._decoder = torch.compile(eager_decoder, dynamic=True)
                started = time.perf_counter()
                score(batches[0])
                score(batches[1])
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - started
        seconds, scores = time_variant(score, batches)
        reference = reference or scores
        row = {"seconds": seconds, "reviews_per_s": len(prompts) / seconds, "compile_s": compile_s,
               "capture_s": scorer.capture_seconds,
               "shapes": len(scorer._graphs.graphs) if scorer._graphs else None,
               "max_abs_diff_vs_first": float(np.max(np.abs(np.array(scores) - np.array(reference))))}
        if variant in args.profile.split(","):
            row["profile"] = profile_variant(score, batches[:args.profile_batches],
                                             out / f"profile_{args.model}_{variant}.txt")
        report["variants"][variant] = row
        (out / f"gpu_forward_{args.model}.json").write_text(json.dumps(report, indent=2))
        print(f"[bench] {variant}: {row}", flush=True)
    print(f"\n{report['gpu']}, {args.model}, {len(prompts)} reviews, {tokens / len(prompts):.0f} tokens/review, "
          f"batch {args.batch_size}, forwards <= {args.max_batch_tokens} tokens")
    print(f"{'variant':26}{'seconds':>9}{'reviews/s':>11}{'compile s':>11}{'capture s':>11}"
          f"{'shapes':>8}{'max |diff|':>12}")
    for name, row in report["variants"].items():
        compile_s = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else "-"
        print(f"{name:26}{row['seconds']:9.2f}{row['reviews_per_s']:11.1f}{compile_s:>11}{row['capture_s']:>11.2f}"
              f"{row['shapes'] or '-':>8}{row['max_abs_diff_vs_first']:12.2e}")
    profiled = {name: row["profile"] for name, row in report["variants"].items() if "profile" in row}
    if profiled:
        kinds = sorted({kind for shares in profiled.values() for kind in shares if kind != "wall_s"})
        print(f"\nshare of wall time, {args.profile_batches} batches: " + "".join(f"{k:>11}" for k in kinds))
        for name, shares in profiled.items():
            print(f"{name:26}" + "".join(f"{100 * shares.get(k, 0.0):10.1f}%" for k in kinds))


if __name__ == "__main__":
    main()
