"""`sentiment-ray score` beside Ray Data LLM + vLLM's classify task (issue 27), same reviews, same GPU, one call.

    source .device/env.sh && source benchmarks/vllm_env.sh
    python3 benchmarks/gpu_vllm_peer.py --model smollm2 --arch .bench/smollm2-arch --data .data/imdb/dev.parquet \
        --rows 100000 --work /tmp/vpeer --out $OUT
    python3 benchmarks/gpu_vllm_peer.py --model mistral7b --data .data/imdb/dev.parquet --rows 5120 \
        --work /tmp/vpeer7 --out $OUT [--quantization fp8]

The model has random weights (none reach the GPU machine) with a random r=16 adapter, as in gpu_peer.py, whose
pieces this reuses: the IMDB dev reviews tiled to --rows (ids `<copy>-<id>`, 16 files), the adapter, and
`score` run as a user runs it (`python -m sentiment_ray.cli score --config <the shipped GPU config>`, a fresh
process timed from start to end). The vLLM side gets the adapter as `sentiment-ray export` writes it (a
*ForSequenceClassification folder, bf16; for the 7B the same folder is built on the GPU from the product's export
functions, as the CLI's float32 CPU merge of 7B weights would not fit the call) and runs in a fresh process too:
Ray Data reads the same Parquet files, a map_batches stage renders each review with the product's own
PromptEncoder from the spec that export keeps in config.json (template, head+tail clipping to max_length, so
both engines see the very same token ids), and ray.data.llm's processor (vLLMEngineProcessorConfig,
task_type="classify", its chat-template/tokenize/detokenize stages off since the rows carry `tokenized_prompt`)
runs one vLLM engine on the GPU (concurrency=1); postprocess keeps P(positive) = `embeddings[1]` (vLLM's
classify pooler applies softmax over the two labels).

Reported for each engine: rows/s end to end (process seconds), start-up (process start to the first output
batch), steady rows/s (rows after the first output batch over the seconds after it; for `score`, also its
manifest's busy-minus-capture figure), peak GPU memory in use (nvidia-smi, every 0.5 s: vLLM's engine runs in its
own process where torch.cuda.max_memory_allocated cannot see it; vLLM reserves gpu_memory_utilization of the card
for weights + KV cache by design, so its figure is mostly that reservation) and mean GPU utilization; then the
agreement of the two engines' P(positive) on the same rows (max, p99, mean |dp|, label agreement at 0.5) and the
accuracy of each on the dev reviews (the first copy of the 2,553 rows; random weights, so near 50 %).
Each part runs in try/except; a failure is recorded in the JSON (`errors`) and the next part still runs. The
JSON ($OUT/gpu_vllm_peer_<model>.json) is rewritten after each part. Subprocesses get the time left of --budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD_FLAG = "--vllm-child"
LOG_KEYS = ("init engine", "torch.compile", "Model loading took", "KV cache", "Graph capturing", "backend",
            "flash_attn", "FA3", "FlashAttention", "max_num_seqs", "Maximum concurrency", "fp8", "Error", "error",
            "Traceback", "CUDA graph", "compil")


class GpuSampler:
    """nvidia-smi memory.used and utilization.gpu of GPU 0 every 0.5 s, with wall-clock timestamps."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), MiB used, utilization %)
        try:
            self._process = subprocess.Popen(["nvidia-smi", "--id=0", "--query-gpu=memory.used,utilization.gpu",
                                              "--format=csv,noheader,nounits", "-lms", "500"],
                                             stdout=subprocess.PIPE, text=True)
        except OSError:
            self._process = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self._process.stdout:
            try:
                used, utilization = (float(x) for x in line.split(",")[:2])
                self.samples.append((time.time(), used, utilization))
            except ValueError:
                continue

    def window(self, start: float, stop: float) -> dict:
        run = [(m, u) for t, m, u in self.samples if start <= t <= stop]
        before = [m for t, m, _ in self.samples if t < start]
        if not run:
            return {}
        busy = [u for _, u in run]
        active = [i for i, u in enumerate(busy) if u > 0]
        steady = busy[active[0]:active[-1] + 1] if active else []
        return {"peak_mib": max(m for m, _ in run), "baseline_mib": before[-1] if before else None,
                "mean_utilization": sum(steady) / len(steady) / 100 if steady else None, "samples": len(run)}

    def close(self):
        if self._process:
            self._process.kill()


def left(args, started: float, reserve: float = 15.0) -> float:
    return max(30.0, args.budget - (time.perf_counter() - started) - reserve)


def export_on_gpu(adapter: Path, model_dir: Path, out: Path) -> Path:
    """The folder `sentiment-ray export` writes, built with the product's export functions on the GPU in bf16
    (the CLI merges in float32 on the CPU: minutes and ~30 GB for a 7B). No float32 self-check here."""
    import torch

    from sentiment_ray.config import ScoringModelConfig
    from sentiment_ray.export.classifier import (
        build_classifier,
        record_prompt_in_config,
        whole_prompt_tokenization_matches,
    )
    from sentiment_ray.export.summary import ExportSummary
    from sentiment_ray.model import backends
    from sentiment_ray.model.metadata import adapter_identity, read_metadata
    from sentiment_ray.model.prompt import PromptEncoder

    if (out / "config.json").exists():
        return out
    metadata = read_metadata(adapter)
    cfg = ScoringModelConfig(name_or_path=str(model_dir), backend="hf", dtype="bfloat16", device="cuda",
                             merge_adapter=True)
    causal_lm, tokenizer, _ = backends.load_for_scoring(cfg, str(model_dir), str(adapter),
                                                        max_length=metadata.prompt.max_length)
    encoder = PromptEncoder(metadata.prompt, tokenizer)
    tokenizer.padding_side = "right"
    classifier = build_classifier(causal_lm, list(encoder.label_token_ids), list(metadata.label_names),
                                  tokenizer.pad_token_id, None)
    summary = ExportSummary(output=str(out), adapter=adapter_identity(adapter), architecture=type(classifier).__name__,
                            dtype="bfloat16", base_model=str(model_dir), base_model_id=metadata.base_model_id,
                            pad_token_id=tokenizer.pad_token_id, temperature=None,
                            tokenization_matches=whole_prompt_tokenization_matches(encoder, tokenizer),
                            max_probe_difference=float("nan"))
    record_prompt_in_config(classifier.config, metadata, summary)
    classifier.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del classifier, causal_lm
    torch.cuda.empty_cache()
    return out


def export_cli(adapter: Path, model_dir: Path, out: Path, timeout: float) -> Path:
    if (out / "config.json").exists():
        return out
    child = subprocess.run([sys.executable, "-m", "sentiment_ray.cli", "export", "--adapter", str(adapter),
                            "--output", str(out), "--dtype", "bfloat16", "--base-model", str(model_dir)],
                           cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if child.returncode != 0:
        raise RuntimeError(f"export failed ({child.returncode}): {child.stderr[-3000:]}")
    return out


# ---------------------------------------------------------------- the vLLM side, in its own process

_ENCODERS: dict = {}


def encode_batch(batch, folder: str):
    """Token ids of each review as `score` builds them: the exported folder's prompt spec and tokenizer through
    sentiment_ray's PromptEncoder (template, cleaning, head+tail clipping to max_length)."""
    import pyarrow as pa

    encoder = _ENCODERS.get(folder)
    if encoder is None:
        from transformers import AutoTokenizer

        from sentiment_ray.model.prompt import PromptEncoder, PromptSpec

        config = json.loads((Path(folder) / "config.json").read_text())
        encoder = PromptEncoder(PromptSpec.from_dict(config["sentiment_ray"]["prompt"]),
                                AutoTokenizer.from_pretrained(folder))
        _ENCODERS[folder] = encoder
    texts = encoder.clean_texts(batch.column("text").to_pylist())
    prompts = encoder.encode_prompts(texts)
    return pa.table({"id": batch.column("id"),
                     "tokenized_prompt": pa.array([p.input_ids for p in prompts], pa.list_(pa.int32()))})


def positive_probability(row: dict) -> dict:
    return {"id": row["id"], "p_vllm": float(row["embeddings"][1]), "tokens": int(row["num_input_tokens"])}


def vllm_child(spec: dict) -> None:
    started = time.time()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(include_dashboard=False, log_to_driver=True)
    ray_ready = time.time()
    engine_kwargs = {"dtype": "bfloat16", "max_model_len": spec["max_model_len"],
                     "gpu_memory_utilization": spec["gpu_memory_utilization"], "enforce_eager": spec["eager"]}
    if spec["quantization"] != "none":
        engine_kwargs["quantization"] = spec["quantization"]
    if spec.get("max_num_seqs"):
        engine_kwargs["max_num_seqs"] = spec["max_num_seqs"]
    engine_kwargs.update(spec.get("engine_args") or {})
    config = vLLMEngineProcessorConfig(model_source=spec["folder"], task_type="classify",
                                       engine_kwargs=engine_kwargs, batch_size=spec["batch_size"], concurrency=1,
                                       chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
                                       log_engine_metrics=False)
    processor = build_processor(config, postprocess=positive_probability)
    built = time.time()
    # Ray 2.60 reads all 16 files in one task as one block: streaming repartition into blocks of --block-rows rows
    # (score's own datasource makes blocks of 4 x its batch size), so that tokenizing runs on all CPUs, the engine
    # stage gets many tasks in flight, and its output arrives block by block (the steady rate is read between them).
    ds = ray.data.read_parquet(spec["inputs"], columns=["id", "text"])
    ds = ds.repartition(target_num_rows_per_block=spec["block_rows"])
    ds = ds.map_batches(encode_batch, fn_kwargs={"folder": spec["folder"]}, batch_format="pyarrow",
                        batch_size=1024)
    out = processor(ds)
    first = None
    first_rows = rows = 0
    ids: list[str] = []
    probabilities: list[float] = []
    tokens = 0
    marks: list[tuple[float, int]] = []  # (time, rows so far) at each output batch
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first is None:
            first, first_rows = time.time(), batch.num_rows
        rows += batch.num_rows
        marks.append((time.time(), rows))
        ids.extend(batch.column("id").to_pylist())
        probabilities.extend(batch.column("p_vllm").to_pylist())
        tokens += sum(batch.column("tokens").to_pylist())
    ended = time.time()
    pq.write_table(pa.table({"id": ids, "p_vllm": probabilities}), spec["output"])
    written = time.time()
    result = {"rows": rows, "tokens": tokens, "started_wall": started, "ray_ready": ray_ready - started,
              "processor_built": built - started, "first_batch": (first or ended) - started,
              "last_batch": ended - started, "written": written - started,
              "steady": (rows - first_rows) / (ended - first) if first and ended > first else None,
              "steady_middle": middle_rate(marks, rows), "output_batches": len(marks),
              "engine_kwargs": engine_kwargs, "batch_size": spec["batch_size"]}
    print("VLLM-RESULT " + json.dumps(result), flush=True)
    ray.shutdown()


def middle_rate(marks: list[tuple[float, int]], rows: int) -> float | None:
    """Rows/s between the output batches at 10 % and 90 % of the rows: no start-up, no tail."""
    inside = [(t, n) for t, n in marks if 0.1 * rows <= n <= 0.9 * rows]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def run_vllm(spec: dict, timeout: float) -> dict:
    started = time.perf_counter()
    wall = time.time()
    try:
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, json.dumps(spec)],
                               capture_output=True, text=True, cwd=REPO, timeout=timeout)
        stdout, stderr, code = child.stdout, child.stderr, child.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        code = "timeout"
    seconds = time.perf_counter() - started
    log = [ln[:400] for ln in (stdout + "\n" + stderr).splitlines() if any(k in ln for k in LOG_KEYS)]
    line = [ln for ln in stdout.splitlines() if ln.startswith("VLLM-RESULT ")]
    if not line:
        raise RuntimeError(f"the vLLM pipeline failed (exit {code}) after {seconds:.0f} s:\n"
                           + "\n".join(log[-40:]) + "\n--- stderr tail:\n" + stderr[-6000:])
    result = json.loads(line[0][len("VLLM-RESULT "):])
    return {**result, "seconds": seconds, "wall_start": wall, "wall_end": time.time(),
            "end_to_end": result["rows"] / seconds, "log": log[-60:]}


# ---------------------------------------------------------------- comparison

def read_scores(output: Path):
    import pyarrow.parquet as pq

    files = sorted(p for p in output.glob("*.parquet") if not p.name.startswith(("_", ".")))
    table = pq.ParquetDataset(files).read(columns=["id", "score"])
    return dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))


def compare(score_out: Path, vllm_out: Path, data: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    ours = read_scores(score_out)
    theirs_table = pq.read_table(vllm_out)
    theirs = dict(zip(theirs_table.column("id").to_pylist(), theirs_table.column("p_vllm").to_pylist()))
    common = [i for i in ours if i in theirs and ours[i] is not None]
    a = np.array([ours[i] for i in common], dtype=np.float64)
    b = np.array([theirs[i] for i in common], dtype=np.float64)
    diff = np.abs(a - b)
    dev = pq.read_table(data, columns=["id", "label"])
    labels = dict(zip(dev.column("id").to_pylist(), dev.column("label").to_pylist()))
    first_copy = [(i, labels[i[2:]]) for i in common if i.startswith("0-") and i[2:] in labels]

    def accuracy(probabilities: dict) -> float | None:
        if not first_copy:
            return None
        return sum(int(probabilities[i] >= 0.5) == y for i, y in first_copy) / len(first_copy)

    return {"rows_compared": len(common), "rows_score": len(ours), "rows_vllm": len(theirs),
            "max_abs_dp": float(diff.max()) if len(diff) else None,
            "p99_abs_dp": float(np.percentile(diff, 99)) if len(diff) else None,
            "mean_abs_dp": float(diff.mean()) if len(diff) else None,
            "label_agreement": float(((a >= 0.5) == (b >= 0.5)).mean()) if len(diff) else None,
            "dev_rows": len(first_copy), "accuracy_score": accuracy(ours), "accuracy_vllm": accuracy(theirs),
            "mean_p_score": float(a.mean()) if len(a) else None, "mean_p_vllm": float(b.mean()) if len(b) else None}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == CHILD_FLAG:
        sys.path.insert(0, str(REPO))
        vllm_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "mistral7b"), required=True)
    parser.add_argument("--arch", help="SmolLM2: a folder with its config.json and tokenizer files")
    parser.add_argument("--data", required=True, help="IMDB dev parquet (id, text, label)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--work", default="/tmp/vpeer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", help="score's config (default: configs/score/<model>_gpu.yaml)")
    parser.add_argument("--override", action="append", default=[], help="extra `section.key=value` for score")
    parser.add_argument("--quantization", choices=("none", "fp8"), default="none",
                        help="vLLM's weights: bf16, or fp8 quantized online at load (per-tensor, Hopper)")
    parser.add_argument("--vllm-batch-size", type=int, default=256, help="rows per batch sent to the engine")
    parser.add_argument("--block-rows", type=int, default=1024,
                        help="rows per Ray Data block into the tokenizing and engine stages (streaming repartition)")
    parser.add_argument("--max-num-seqs", type=int, help="vLLM's max_num_seqs (default: vLLM's, 1024 on H100)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's (its default 0.9)")
    parser.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no torch.compile/CUDA graphs)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="another vLLM engine argument, e.g. enable_prefix_caching=false (the tiled reviews "
                             "repeat: vLLM's prefix cache would skip the repeats' compute, which real data does "
                             "not offer) or max_num_batched_tokens=16384")
    parser.add_argument("--export", choices=("auto", "cli", "gpu"), default="auto",
                        help="how the seq-cls folder is made (auto: cli for smollm2, gpu for mistral7b)")
    parser.add_argument("--skip", action="append", default=[], choices=("score", "vllm"))
    parser.add_argument("--budget", type=float, default=580, help="seconds for the whole script (subprocess "
                        "timeouts get what is left)")
    args = parser.parse_args()
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_common import gpu_name
    from benchmarks.gpu_peer import run_score
    from benchmarks.gpu_streaming import PROMPT, build_model_and_adapter, tile

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / f"gpu_vllm_peer_{args.model}{'_fp8' if args.quantization == 'fp8' else ''}.json"
    config = args.config or f"configs/score/{args.model}_gpu.yaml"
    report: dict = {"model": args.model, "rows": args.rows, "config": config, "quantization": args.quantization,
                    "errors": {}, "versions": {}}
    sampler = GpuSampler()

    def save():
        report["seconds_total"] = time.perf_counter() - started
        report_path.write_text(json.dumps(report, indent=2, default=str))

    def part(name: str, fn):
        t = time.perf_counter()
        try:
            value = fn()
            print(f"[vpeer] {name}: ok in {time.perf_counter() - t:.1f} s", flush=True)
            return value
        except BaseException as exc:  # noqa: BLE001 - SystemExit from gpu_peer.run_score too
            if isinstance(exc, KeyboardInterrupt):
                raise
            report["errors"][name] = "".join(traceback.format_exception(exc))[-6000:]
            print(f"[vpeer] {name}: FAILED after {time.perf_counter() - t:.1f} s\n{report['errors'][name]}",
                  flush=True)
            return None
        finally:
            save()

    def versions():
        import importlib.metadata as md

        import torch
        report["gpu"] = gpu_name()
        for name in ("torch", "transformers", "vllm", "ray", "pydantic", "peft"):
            try:
                report["versions"][name] = md.version(name)
            except md.PackageNotFoundError:
                report["versions"][name] = None
        report["versions"]["cuda"] = torch.version.cuda

    part("versions", versions)

    def setup():
        model_dir, adapter = build_model_and_adapter(args.model, args.arch, args.data, work)
        inputs = tile(args.data, args.rows, work / f"in-{args.rows}")
        return model_dir, adapter, inputs

    ready = part("setup", setup)
    if ready is None:
        return
    model_dir, adapter, inputs = ready
    max_length = PROMPT["max_length"] if args.model == "smollm2" else 512
    report["prompt_max_length"] = max_length

    def export():
        how = args.export if args.export != "auto" else ("cli" if args.model == "smollm2" else "gpu")
        report["export_how"] = how
        folder = work / f"exported-{args.model}"
        if how == "gpu":
            return export_on_gpu(adapter, model_dir, folder)
        return export_cli(adapter, model_dir, folder, left(args, started))

    score_out = work / f"score-out-{args.rows}"
    vllm_out = work / f"vllm-out-{args.rows}{'-fp8' if args.quantization == 'fp8' else ''}.parquet"

    def score():
        overrides = [f"model.name_or_path={model_dir}", *args.override]
        wall = time.time()
        result = run_score(config, adapter, inputs, score_out, overrides)
        result["overrides"] = overrides
        result["startup"] = result["timeline"].get("first_batch")
        result["gpu"] = sampler.window(wall, time.time())
        return result

    if "score" not in args.skip:
        report["score"] = part("score", score)
    exported = part("export", export) if "vllm" not in args.skip else None

    def vllm():
        spec = {"folder": str(exported), "inputs": str(inputs), "output": str(vllm_out),
                "max_model_len": max_length, "quantization": args.quantization, "batch_size": args.vllm_batch_size,
                "max_num_seqs": args.max_num_seqs, "gpu_memory_utilization": args.gpu_memory_utilization,
                "eager": args.eager, "block_rows": args.block_rows,
                "engine_args": {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.engine_arg)}}
        result = run_vllm(spec, left(args, started))
        result["startup"] = result["first_batch"]
        result["gpu"] = sampler.window(result["wall_start"], result["wall_end"])
        return result

    if exported is not None:
        report["vllm"] = part("vllm", vllm)
    # with --skip score or --skip vllm, against the output an earlier call left in --work for the same rows
    if ((report.get("vllm") or report.get("score")) and vllm_out.exists()
            and (score_out / "_sentiment_ray_manifest.json").exists()):
        report["agreement"] = part("agreement", lambda: compare(score_out, vllm_out, args.data))
    sampler.close()
    save()
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report.get('gpu')}, {report['model']} (random weights, r=16 adapter), {report['rows']} rows; "
          f"vLLM {report['versions'].get('vllm')}, quantization {report['quantization']}")
    print(f"{'engine':34}{'rows':>8}{'seconds':>9}{'end to end':>12}{'steady':>9}{'start-up':>10}"
          f"{'peak MiB':>10}{'GPU busy':>10}")
    for key, name in (("score", "sentiment-ray score"), ("vllm", "Ray Data LLM + vLLM classify")):
        r = report.get(key)
        if not r:
            print(f"{name:34}  failed or skipped")
            continue
        steady = r.get("steady_span") if key == "score" else r.get("steady")
        gpu = r.get("gpu") or {}
        busy = gpu.get("mean_utilization")
        print(f"{name:34}{r['rows']:>8}{r['seconds']:>9.1f}{r['end_to_end']:>12.1f}"
              f"{(steady or 0):>9.1f}{(r.get('startup') or 0):>10.1f}{(gpu.get('peak_mib') or 0):>10.0f}"
              f"{(busy * 100 if busy is not None else 0):>9.0f}%")
    if report.get("score"):
        print(f"score steady (busy minus capture): {report['score']['steady_busy_minus_capture']:.1f} rows/s")
    a = report.get("agreement")
    if a:
        print(f"agreement on {a['rows_compared']} rows: max |dp| {a['max_abs_dp']:.2e}, p99 {a['p99_abs_dp']:.2e}, "
              f"mean {a['mean_abs_dp']:.2e}, labels agree {a['label_agreement']:.4f}; dev accuracy "
              f"({a['dev_rows']} rows): score {a['accuracy_score']}, vLLM {a['accuracy_vllm']}")
    if report["errors"]:
        print("errors in: " + ", ".join(report["errors"]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
