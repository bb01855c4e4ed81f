"""First check of the vLLM bundle on the GPU machine (issue 27): versions, every import of the classify path, then
vLLM's classify task on a small random *ForSequenceClassification model, directly and through ray.data.llm.

    source .device/env.sh && source benchmarks/vllm_env.sh
    python3 benchmarks/vllm_smoke.py --arch .bench/smollm2-arch
    python benchmarks/vllm_smoke.py --imports-only      # on the CPU machine too: the modules that need CUDA fail

Each step runs on its own and reports all its failures (tracebacks), so one call lists every missing module at
once; the summary line at the end says which steps failed, and the exit status is 1 if any did. The model is
SmolLM2-135M's architecture (`--arch`: config + tokenizer, no weights) with random weights and a 2-label score
head; without --arch a tiny Llama (4 layers, 64-dim heads) fed token ids only (no tokenizer).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

# The modules the classify path loads, front end to kernels (vLLM 0.26.0 names), then ray.data.llm's.
MODULES = (
    "vllm", "vllm.entrypoints.llm", "vllm.engine.arg_utils", "vllm.v1.engine.async_llm", "vllm.v1.engine.core",
    "vllm.v1.engine.core_client", "vllm.v1.executor.uniproc_executor", "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner", "vllm.model_executor.model_loader", "vllm.model_executor.models.llama",
    "vllm.model_executor.models.mistral", "vllm.model_executor.models.adapters", "vllm.model_executor.layers.pooler",
    "vllm.model_executor.layers.quantization.fp8", "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.fa_utils", "vllm.vllm_flash_attn.flash_attn_interface", "vllm.compilation.backends",
    "vllm.v1.structured_output", "vllm.v1.metrics.ray_wrappers", "vllm.v1.engine.exceptions", "vllm.inputs.llm",
    "vllm.pooling_params", "vllm.outputs", "vllm.platforms.cuda", "vllm._custom_ops", "vllm.device_allocator.cumem",
    "ray.data.llm", "ray.llm._internal.batch.processor.vllm_engine_proc",
    "ray.llm._internal.batch.stages.vllm_engine_stage",
)
VERSIONS = ("torch", "transformers", "vllm", "ray", "pydantic", "pydantic_core", "msgspec", "typing_extensions",
            "triton", "fastapi", "starlette", "openai", "httpx2", "anyio", "aiohttp", "idna", "h11", "zmq", "cbor2",
            "xgrammar", "tvm_ffi", "llguidance", "openai_harmony", "compressed_tensors", "depyf", "numpy",
            "safetensors", "tokenizers", "huggingface_hub", "uvloop", "psutil", "einops", "prometheus_client")


def versions() -> None:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in VERSIONS:
        try:
            module = importlib.import_module(name)
            where = str(Path(getattr(module, "__file__", "") or "?").parent)
            print(f"  {name:20} {getattr(module, '__version__', '?'):18} {where}")
        except Exception as exc:  # noqa: BLE001 - reporting only
            print(f"  {name:20} MISSING ({type(exc).__name__}: {exc})")
    import torch

    if torch.cuda.is_available():
        print(f"  cuda {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
              f"capability {torch.cuda.get_device_capability(0)}")


def imports() -> list[str]:
    failed = []
    for name in MODULES:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
            print(f"  ok    {name} ({time.perf_counter() - started:.1f} s)")
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a module too
            failed.append(name)
            print(f"  FAIL  {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=-6)
    print(f"imports: {len(MODULES) - len(failed)} ok, {len(failed)} failed {failed}")
    return failed


def build_model(arch: str | None, out: Path) -> tuple[Path, list[list[int]]]:
    """A random-weight LlamaForSequenceClassification (2 labels) saved with safetensors, and 16 prompts' ids."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    if arch:
        config = AutoConfig.from_pretrained(arch)
        tokenizer = AutoTokenizer.from_pretrained(arch)
        texts = [f"Review: {'A wonderful film. ' * (i + 1)}{'Dull. ' * i}\nSentiment:" for i in range(16)]
        prompts = [tokenizer(t)["input_ids"] for t in texts]
    else:
        config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        tokenizer = None
        prompts = [[1] + [(7 * i + j) % 1000 + 3 for j in range(8 + 9 * i)] for i in range(16)]
    config.num_labels = 2
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    config.problem_type = "single_label_classification"
    config.architectures = ["LlamaForSequenceClassification"]
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out, prompts


def reference(folder: Path, prompts: list[list[int]]) -> list[float]:
    """P(label 1) from transformers, one prompt at a time (no padding), float32 on the GPU."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    with torch.inference_mode():
        out = [torch.softmax(model(input_ids=torch.tensor([p], device="cuda")).logits.float(), -1)[0, 1].item()
               for p in prompts]
    del model
    torch.cuda.empty_cache()
    return out


def vllm_direct(folder: Path, prompts: list[list[int]], tokenizer: bool, eager: bool) -> list[float]:
    import vllm
    from vllm.inputs.llm import TokensPrompt

    started = time.perf_counter()
    llm = vllm.LLM(model=str(folder), runner="pooling", convert="classify", dtype="bfloat16", max_model_len=512,
                   gpu_memory_utilization=0.3, enforce_eager=eager, skip_tokenizer_init=not tokenizer)
    ready = time.perf_counter()
    outputs = llm.classify([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False)
    print(f"  vllm.LLM ready in {ready - started:.1f} s, classify {len(prompts)} in "
          f"{time.perf_counter() - ready:.2f} s")
    probabilities = [o.outputs.probs[1] for o in outputs]
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):  # free the GPU for the next step's engine
        core.shutdown()
    del llm
    import gc

    gc.collect()
    return probabilities


def ray_data_llm(folder: Path, prompts: list[list[int]], eager: bool) -> list[float]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ray.init(include_dashboard=False, ignore_reinit_error=True)
    config = vLLMEngineProcessorConfig(
        model_source=str(folder), task_type="classify",
        engine_kwargs={"dtype": "bfloat16", "max_model_len": 512, "gpu_memory_utilization": 0.3,
                       "enforce_eager": eager},
        batch_size=8, concurrency=1, chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False)
    processor = build_processor(config, postprocess=lambda row: {"i": row["i"], "p": float(row["embeddings"][1]),
                                                                  "n": int(row["num_input_tokens"])})
    started = time.perf_counter()
    rows = processor(ray.data.from_items([{"i": i, "tokenized_prompt": p} for i, p in enumerate(prompts)])).take_all()
    print(f"  ray.data.llm: {len(rows)} rows in {time.perf_counter() - started:.1f} s; columns {sorted(rows[0])}")
    ray.shutdown()
    return [r["p"] for r in sorted(rows, key=lambda r: r["i"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="a folder with config.json + tokenizer files (SmolLM2's)")
    parser.add_argument("--imports-only", action="store_true")
    parser.add_argument("--eager", action="store_true", help="vLLM enforce_eager for the direct run too")
    parser.add_argument("--work", default="/tmp/vllm_smoke")
    args = parser.parse_args()
    status: dict[str, str] = {}
    print("== versions")
    versions()
    print("== imports")
    failed = imports()
    status["imports"] = "ok" if not failed else f"{len(failed)} failed"
    if not args.imports_only:
        results = {}
        steps = ("model", "transformers reference", "vllm.LLM classify", "ray.data.llm classify (eager)")
        folder = prompts = None
        for name in steps:
            print(f"== {name}")
            started = time.perf_counter()
            try:
                if name == "model":
                    folder, prompts = build_model(args.arch, Path(args.work) / "seqcls")
                elif folder is None:
                    raise RuntimeError("no model")
                elif name.startswith("transformers"):
                    results["reference"] = reference(folder, prompts)
                elif name.startswith("vllm.LLM"):
                    results["vllm"] = vllm_direct(folder, prompts, tokenizer=bool(args.arch), eager=args.eager)
                else:
                    results["ray"] = ray_data_llm(folder, prompts, eager=True)
                status[name] = f"ok ({time.perf_counter() - started:.0f} s)"
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                status[name] = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
                traceback.print_exc()
        ref = results.get("reference")
        for key in ("vllm", "ray"):
            if ref and results.get(key):
                diff = max(abs(a - b) for a, b in zip(ref, results[key]))
                print(f"  max |P(positive) {key} - transformers fp32| = {diff:.2e} over {len(ref)} prompts")
        print("  probabilities: " + json.dumps({k: [round(x, 4) for x in v[:6]] for k, v in results.items()}))
    print("SMOKE " + json.dumps(status))
    sys.exit(0 if all(v == "ok" or v.startswith("ok ") for v in status.values()) else 1)


if __name__ == "__main__":
    main()
