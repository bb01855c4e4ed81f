# Source this on the GPU machine, from the project root, after .device/env.sh:
#     source .device/env.sh && source benchmarks/vllm_env.sh && python3 benchmarks/vllm_smoke.py ...
# The first time on a machine, joins the slices of the vLLM bundle (benchmarks/build_vllm_bundle.sh) found in
# /tmp/parts (where each part's call copied them) or in .vllm/part_*/ (carried folders that are still there),
# checks the sha256 recorded with them, and unpacks into /tmp/vllm_site (5-10 s). Then puts that tree LAST on
# PYTHONPATH (after .device's /tmp/site and the project: their pydantic, msgspec, typing-extensions and ray are the
# ones loaded) and sets vLLM's offline settings. Ray workers and vLLM's engine-core process inherit all of it.
# Without .device/env.sh sourced (a warm machine where /tmp/site is already unpacked and .device did not travel),
# it sets the same environment as .device/env.sh itself.
_vllm_fail() { echo "vllm_env.sh: $*" >&2; return 1; }
if [ ! -f /tmp/vllm_site/.ok ]; then
  _slices=$(ls /tmp/parts/vllm_site.tar.xz.* 2>/dev/null | sort -V)
  [ -n "$_slices" ] || _slices=$(ls .vllm/part_*/vllm_site.tar.xz.* 2>/dev/null | sort -V)
  [ -n "$_slices" ] || { _vllm_fail "no slices in /tmp/parts or .vllm/part_*: bring every part first (RUNBOOK)"; return 1; }
  _want=$(cat "$(dirname "$(echo "$_slices" | head -1)")/SHA256" 2>/dev/null || cat /tmp/parts/SHA256)
  echo "vllm_env.sh: joining $(echo "$_slices" | wc -l) slices: $(echo $_slices | xargs -n1 basename | tr '\n' ' ')"
  # shellcheck disable=SC2086
  cat $_slices > /tmp/vllm_site.tar.xz || { _vllm_fail "join failed"; return 1; }
  _got=$(sha256sum /tmp/vllm_site.tar.xz | cut -d' ' -f1)
  if [ "$_got" != "$_want" ]; then
    _vllm_fail "sha256 mismatch: got $_got, want $_want (a part missing or from another build?)"; return 1
  fi
  rm -rf /tmp/vllm_site && mkdir -p /tmp/vllm_site
  tar -xJf /tmp/vllm_site.tar.xz -C /tmp/vllm_site || { _vllm_fail "unpack failed"; return 1; }
  rm -f /tmp/vllm_site.tar.xz
  # The machine sets PYTHONDONTWRITEBYTECODE=1 and the bundle holds no bytecode, so every process (driver, Ray
  # worker, vLLM's engine core) would compile vLLM's ~2,000 modules from source again: compile them once here.
  python3 -m compileall -q -j 0 /tmp/vllm_site >/dev/null 2>&1 || true
  touch /tmp/vllm_site/.ok
  echo "vllm_env.sh: unpacked to /tmp/vllm_site ($(du -sh /tmp/vllm_site | cut -f1))"
fi
case ":${PYTHONPATH:-}:" in
  *:/tmp/site:*) ;;
  *) [ -f /tmp/site/.ok ] || { _vllm_fail "/tmp/site is not unpacked: source .device/env.sh first"; return 1; }
     export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf \
       UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1 ;;
esac
case ":$PYTHONPATH:" in *:/tmp/vllm_site:*) ;; *) export PYTHONPATH=$PYTHONPATH:/tmp/vllm_site ;; esac
# vLLM 0.26 is V1 only (no VLLM_USE_V1); no usage reports (no network there); caches in /tmp, kept while warm.
# FlashAttention: vLLM picks FA3 on Hopper by itself (FA2's library is not in the bundle).
# FlashInfer is not in the bundle: its top-k/top-p sampler, which the engine builds even for a pooling model, must be
# off (vllm/v1/sample/ops/topk_topp_sampler.py imports flashinfer unless VLLM_USE_FLASHINFER_SAMPLER=0; seen on H100).
export VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1 DO_NOT_TRACK=1 \
  VLLM_CACHE_ROOT=/tmp/vllm_cache VLLM_CONFIG_ROOT=/tmp/vllm_config \
  VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO} VLLM_WORKER_MULTIPROC_METHOD=spawn
# The same for .device's tree (Ray, TRL, ...), once per machine.
if [ -f /tmp/site/.ok ] && [ ! -f /tmp/site/.compiled ]; then
  python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1 || true
  touch /tmp/site/.compiled
fi
