#!/usr/bin/env bash
# Builds vLLM 0.26.0 for the GPU machine (issue 27: `sentiment-ray score` beside Ray Data LLM + vLLM's classify
# task), as one xz-packed tree split into parts that travel one `run` call each (64 MiB per call in all).
#   usage (from the project root): benchmarks/build_vllm_bundle.sh [DEST]     (DEST defaults to .vllm, git-ignored)
# Writes DEST/part_1 ... DEST/part_N, each holding one slice `vllm_site.tar.xz.NN` and SHA256 (of the whole
# archive), plus DEST/RUNBOOK.txt with the `run` calls and their byte counts. On the GPU machine,
# benchmarks/vllm_env.sh joins the slices, checks the sha256, unpacks into /tmp/vllm_site once and sets PYTHONPATH.
#
# Why 0.26.0: vLLM 0.22.0-0.26.0 pin torch==2.11.0, the GPU machine's own (cu130); 0.27+ pin torch 2.13/2.14,
# which cannot travel. Ray 2.60's ray.data.llm is written against vLLM 0.29 (its `llm` extra), so the newest
# release that fits is the one whose API is closest to what ray.data.llm calls: AsyncEngineArgs(runner="pooling",
# convert="classify", enable_log_requests=...), AsyncLLMEngine.encode(prompt=, pooling_params=, request_id=,
# tokenization_kwargs=, lora_request=), PoolingParams(task="classify"), vllm.inputs.llm.TokensPrompt (>= 0.19),
# vllm.v1.engine.exceptions.EngineDeadError. All are in 0.26.0 (checked in its source); 0.22.0 is as large
# (the same five big shared libraries) and further from 0.29.
#
# Targets the GPU machine's image: Python 3.12, torch 2.11.0+cu130, transformers 5.17.0, and the packages listed
# in the device docs (aiohttp, psutil, cloudpickle, prometheus-client, py-cpuinfo, uvloop, einops, httpx, anyio,
# requests, pyyaml, sentencepiece, tiktoken, pillow, numba, opencv ...). Not duplicated either: what .device
# brings (pydantic 2.14.4, msgspec 0.22.0, typing-extensions 4.16.0, jsonschema, ray 2.60.0, gguf): .device's
# /tmp/site comes first on PYTHONPATH, this tree last, so those versions are the ones loaded.
# vLLM is installed --no-deps (a full install resolves to 198 packages: CUDA 13 toolkits, flashinfer, cutlass-dsl,
# tilelang ...); the packages below are those that `import vllm`, `from vllm import LLM`, the engine core, the
# GPU worker / model runner / Llama and Mistral models / FlashAttention backend / pooler modules and
# `from ray.data.llm import ...` import and the image lacks (found by following import errors on the CPU machine:
# benchmarks/vllm_smoke.py --imports-only; the modules that only import with CUDA are listed there).
#
# Local check (CPU machine, Python 3.11): PYVER=3.11 TREE_ONLY=/tmp/vllm_site311 benchmarks/build_vllm_bundle.sh
# installs the same pins for 3.11 into that folder, pruned alike, and packs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
D=$(realpath -m "${1:-.vllm}")
ROOT=${ROOT:-$(dirname "$D")}   # the project root that `run` copies, where .device/.bench/.data lie (for RUNBOOK)
PYVER=${PYVER:-3.12}
if [ -n "${SPLIT_ONLY:-}" ] && [ -f "$D/vllm_site.tar.xz" ]; then
  echo "SPLIT_ONLY: cutting the existing $D/vllm_site.tar.xz again"
else
CACHE=${VLLM_DL_CACHE:-$HOME/.cache/sentiment_ray/vllm_wheels/py$PYVER}   # the vllm wheel is 304 MB: keep it
mkdir -p "$CACHE"
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
P="--no-deps --only-binary=:all: --python-version $PYVER --implementation cp --platform manylinux_2_28_x86_64 \
 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_26_x86_64 \
 --platform manylinux_2_5_x86_64"
# Pins: vLLM 0.26.0's own requirements where it pins (compressed-tensors, depyf, llguidance <1.8, fastapi <0.137,
# starlette >=1.0.1, openai >=2); xgrammar 0.2.1 is the one that loads with apache-tvm-ffi 0.1.10 (vLLM's pin);
# opentelemetry api/sdk must be the same release.
PKGS=(
  vllm==0.26.0
  # engine core <-> front end (msgspec comes from .device)
  pyzmq==27.3.0 cbor2==6.3.0 pybase64==1.5.1 cachetools==8.0.3 blake3==1.0.11 setproctitle==1.3.8
  # vllm.entrypoints (LLM, the OpenAI protocol types it shares) and what they import at module level
  openai==3.63.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
  openai-harmony==0.0.8
  fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7 ijson==3.6.0
  # structured outputs: vllm.v1.request imports v1/structured_output, whose XgrammarGrammar dataclass annotates
  # fields with xgr.* types, so the LazyLoader loads xgrammar (53 MB .so) at import; llguidance likewise
  llguidance==1.7.6 xgrammar==0.2.1 apache-tvm-ffi==0.1.10
  # quantization configs (fp8 goes through vllm's own Fp8Config, compressed-tensors is imported by the registry)
  compressed-tensors==0.17.0 loguru==0.7.3
  # torch.compile integration
  depyf==0.20.0 astor==0.8.1
  # tracing hooks imported by the engine
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  ${EXTRA_WHEELS:-}
)
python3 -m pip download -q $P -d "$CACHE" "${PKGS[@]}"
# install only this list's wheels (the cache may hold others)
wheels=()
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}; version=${spec#*==}; norm=$(echo "$name" | tr '-' '_' | tr 'A-Z' 'a-z')
  match=$(ls "$CACHE" | awk -v n="$norm" -v v="$version" 'tolower($0) ~ "^"n"-"v"-"' | head -1)
  [ -n "$match" ] || { echo "no wheel for $spec in $CACHE" >&2; exit 1; }
  wheels+=("$CACHE/$match")
done
python3 -m pip install -q --no-index --no-compile --no-cache-dir $P --target "$W/site" "${wheels[@]}"
cd "$W/site"

# ---- pruning (each line: what goes, and why the classify path on one H100 never loads it) ----
# FlashAttention 2 (305 MB): on Hopper vLLM picks FA3 (v1/attention/backends/fa_utils.get_flash_attn_version:
# capability 9.x and FA3 importable -> 3); flash_attn_interface imports _vllm_fa2_C inside try/except. FA2 would
# only be chosen for ALiBi models or when attention_config.flash_attn_version=2 is forced (there is no
# VLLM_FLASH_ATTN_VERSION environment variable in 0.26): neither applies to Llama/Mistral. FA3 (153 MB, 8 MB xz) stays.
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so
# FlashAttention 4 (CuTe DSL, 2 MB of Python): needs nvidia-cutlass-dsl, not carried. Its presence alone makes
# is_fa_version_supported(4) true; without it vLLM cannot "upgrade" an FA3 case to FA4 and then fail on import.
rm -rf vllm/vllm_flash_attn/cute vllm/third_party/tml_fa4
# MoE kernels (47.5 MB, 40 MB xz): imported under contextlib.suppress(ImportError) in platforms/cuda.py
# (import_kernels); its ops (torch.ops._moe_C.*) are called only from fused_moe. SmolLM2 and Mistral-7B are dense.
rm -f vllm/_moe_C_stable_libtorch.abi3.so
# Rust front end (43 MB executable): only with VLLM_USE_RUST_FRONTEND=1 (envs.py, default 0).
rm -f vllm/vllm-rs
# DeepGEMM (35 MB: headers + _C for five Pythons): block-scaled fp8 GEMMs and MoE; utils/import_utils.has_deep_gemm()
# then reports False and vLLM takes its other kernels. Our fp8 is per-tensor (Fp8Config), which uses _C's CUTLASS.
rm -rf vllm/third_party/deep_gemm
# SM100 (Blackwell) sparse attention for MiniMax M3 (30 MB of CUTLASS headers), and gpt-oss MoE Triton kernels.
rm -rf vllm/third_party/fmha_sm100 vllm/third_party/triton_kernels
# MLA attention (DeepSeek): both imports are guarded (v1/attention/ops/flashmla.py).
rm -f vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so vllm/third_party/flashmla/*.so
# FP4 (QuTLASS, guarded import), Rust tool-call parser (importlib, guarded), KV-cache offload to files (kv_offload).
rm -f vllm/_qutlass_C.abi3.so vllm/_rust_tool_parser.abi3.so vllm/fs_io_C.abi3.so
# `vllm bench` and the API server's Swagger UI.
rm -rf vllm/benchmarks vllm/entrypoints/serve/instrumentator/static
# Triton autotuning / Helion configs for GPUs other than H100/H200 (kernels/helion, fused_moe configs: JSON only).
find vllm -name '*.json' -path '*configs*' ! -iname '*H100*' ! -iname '*H200*' -delete
# xgrammar's C++ sources and headers (it ships prebuilt .so), type stubs, byte code, tests.
rm -rf xgrammar/csrc xgrammar/include 3rdparty
# Static libraries (xgrammar/lib/libxgrammar.a, 65 MB) are for linking against, never loaded by Python; tvm_ffi's
# 3rdparty holds sources/headers for building extensions (libinfo only points include paths at it).
find . -name '*.a' -delete
rm -rf tvm_ffi/3rdparty
# DWARF debug info (xgrammar's bindings carry 50 MB of it): strip --strip-debug drops only .debug_* sections, which
# the loader never maps; symbols (.dynsym, .symtab) and CUDA fat binaries (.nv_fatbin) stay as they are.
for so in $(find . -name '*.so*' -type f); do
  if readelf -S -W "$so" 2>/dev/null | grep -q '\.debug_info'; then strip --strip-debug "$so"; fi
done
find . \( -name '__pycache__' -o -name 'tests' -o -name 'test' \) -type d -prune -exec rm -rf {} +
find . -name '*.pyi' -delete
# every .so that remains, for the record
find . -name '*.so' -size +1M -printf '%s %p\n' | sort -rn | head -20 >&2

if [ -n "${TREE_ONLY:-}" ]; then
  rm -rf "$TREE_ONLY"; mkdir -p "$(dirname "$TREE_ONLY")"; cp -a "$W/site" "$TREE_ONLY"
  du -sh "$TREE_ONLY"; exit 0
fi

mkdir -p "$D"; rm -rf "$D"/part_*
# xz -9e in one block (-T1): the large shared libraries share little with each other, but the one-block dictionary
# (64 MiB) still finds the repeats inside each. The whole archive stays in DEST (git-ignored, never carried) so that
# `SPLIT_ONLY=1 benchmarks/build_vllm_bundle.sh` can cut it again (e.g. after the working tree grew).
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - . | xz -9e -T1 > "$D/vllm_site.tar.xz"
cd "$ROOT"
fi
# Cut into parts sized for the `run` calls (vllm_runbook.py: as few calls as fit 64 MiB each with the working
# tree; the last part rides with .device and .bench in the smoke call where it fits), write SHA256 and RUNBOOK.txt.
python3 "$here/vllm_runbook.py" split "$D" "$ROOT"
python3 "$here/vllm_runbook.py" runbook "$D" "$ROOT" > "$D/RUNBOOK.txt"
cat "$D/RUNBOOK.txt"
