"""Cuts the vLLM bundle into parts for the `run` calls and writes the RUNBOOK: which call carries what, with bytes.

    python3 benchmarks/vllm_runbook.py split   .vllm [ROOT]    # .vllm/vllm_site.tar.xz -> .vllm/part_N/ + SHA256
    python3 benchmarks/vllm_runbook.py runbook .vllm [ROOT]    # the calls, printed (the builder saves RUNBOOK.txt)

ROOT is the project root that `run` copies (default: the folder holding .vllm). At most 64 MiB travel per call,
the working tree included (tracked files and untracked files that git does not ignore), so a part travels alone
with the tree, except the last one, which rides with .device and .bench in the smoke call where it fits. The plan
takes as few calls as that allows (MARGIN_MIB spare in each, for the tree growing a little before the calls).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 1024 * 1024
MIB = 1024 * 1024
MARGIN = int(float(os.environ.get("MARGIN_MIB", "1.5")) * MIB)
ARCHIVE = "vllm_site.tar.xz"
SMOKE = ("source .device/env.sh && source benchmarks/vllm_env.sh && "
         "python3 benchmarks/vllm_smoke.py --arch .bench/smollm2-arch")
PEER = ("source .device/env.sh && source benchmarks/vllm_env.sh && python3 benchmarks/gpu_vllm_peer.py "
        "--model {model} --data .data/imdb/dev.parquet --rows {rows} --work /tmp/vpeer-{model} --out $OUT{extra}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def tree_bytes(root: Path) -> int:
    """What `run` copies of the working tree: tracked files and untracked files that git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file())


def sizes(root: Path) -> dict[str, int]:
    return {"tree": tree_bytes(root), **{name: folder_bytes(root / f".{name}") for name in ("device", "bench", "data")}}


def plan(total: int, s: dict[str, int]) -> list[int]:
    """Slice sizes: the fewest calls, a part alone with the tree, the last one riding with .device + .bench."""
    alone = LIMIT - s["tree"] - MARGIN - 4096  # 4 KiB: the SHA256 file and folder entries
    ride = max(0, LIMIT - s["tree"] - s["device"] - s["bench"] - MARGIN - 4096)
    if total <= ride:
        return [total]
    riding = math.ceil((total - ride) / alone)  # parts alone, then one riding part
    plain = math.ceil(total / alone)            # parts alone only; the smoke call carries none
    if riding < plain:
        each = math.ceil((total - ride) / riding)
        return [each] * riding + [total - each * riding]
    each = math.ceil(total / plain)
    return [each] * (plain - 1) + [total - each * (plain - 1)]


def split(bundle: Path, root: Path) -> None:
    archive = bundle / ARCHIVE
    total = archive.stat().st_size
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    for old in bundle.glob("part_*"):
        shutil.rmtree(old)
    with archive.open("rb") as source:
        for n, size in enumerate(plan(total, sizes(root)), 1):
            part = bundle / f"part_{n}"
            part.mkdir()
            (part / f"{ARCHIVE}.{n:02d}").write_bytes(source.read(size))
            (part / "SHA256").write_text(digest + "\n")
        assert not source.read(1)


def runbook(bundle: Path, root: Path) -> str:
    parts = sorted((p for p in bundle.glob("part_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    s = sizes(root)
    rel = bundle.relative_to(root) if bundle.is_relative_to(root) else bundle
    total = sum(folder_bytes(p) for p in parts) - sum((p / "SHA256").stat().st_size for p in parts)
    each = ", ".join(f"{folder_bytes(p):,}" for p in parts)
    lines = [f"vLLM 0.26.0 bundle: {total:,} B of xz in {len(parts)} parts ({each} B), "
             f"sha256 {(parts[0] / 'SHA256').read_text().strip() if parts else '-'}",
             f"working tree {s['tree']:,} B, .device {s['device']:,} B, .bench {s['bench']:,} B, "
             f".data {s['data']:,} B; at most {LIMIT:,} B per call", "",
             "Calls, back to back on one warm machine (it stays warm about 30 s after each):"]
    calls = []
    copy = "mkdir -p /tmp/parts && cp {p}/* /tmp/parts/ && ls -la /tmp/parts"
    for i, part in enumerate(parts, 1):
        carry, command = [f"{rel}/{part.name}"], copy.format(p=f"{rel}/{part.name}")
        size = s["tree"] + folder_bytes(part)
        if i == len(parts) and size + s["device"] + s["bench"] <= LIMIT:
            carry += [".device", ".bench"]
            size += s["device"] + s["bench"]
            command += " && " + SMOKE
        calls.append((carry, size, command))
    if not calls or ".device" not in calls[-1][0]:
        calls.append(([".device", ".bench"], s["tree"] + s["device"] + s["bench"], SMOKE))
    peer = s["tree"] + s["device"] + s["bench"] + s["data"]
    smol = PEER.format(model="smollm2", rows=100000, extra=" --arch .bench/smollm2-arch")
    big = PEER.format(model="mistral7b", rows=5120, extra="")
    calls.append(([".device", ".bench", ".data"], peer, smol))
    calls.append(([".device", ".bench", ".data"], peer, "(optional) " + smol + " --skip score --quantization fp8"))
    calls.append(([".device", ".data"], peer - s["bench"], "(optional) " + big))
    calls.append(([".device", ".data"], peer - s["bench"], "(optional) " + big + " --skip score --quantization fp8"))
    for n, (carry, size, command) in enumerate(calls, 1):
        flag = "" if size <= LIMIT else "   <-- OVER THE LIMIT"
        lines += [f"{n}. carry {carry}   ({size:,} B = {size / MIB:.1f} MiB){flag}", f"   {command}"]
    lines += ["",
              "The smoke call joins the parts (/tmp/parts, or .vllm/part_* still on the machine), checks the sha256,",
              "unpacks /tmp/vllm_site (once per machine), and lists every failing import at once; the calls after it",
              "find /tmp/vllm_site and /tmp/site in place. A machine that went back (a fresh one has neither) needs",
              "the parts again from call 1. On the warm machine .device may stay home after the smoke call:",
              "benchmarks/vllm_env.sh sets .device/env.sh's environment itself when /tmp/site is there.",
              "A `--skip score` call reuses the model, adapter, export and score output the same --work holds, and",
              "compares its vLLM run with that score output. Each benchmark call writes",
              "$OUT/gpu_vllm_peer_<model>[_fp8].json after every part and prints a table at the end."]
    return "\n".join(lines)


def main() -> None:
    command, bundle = sys.argv[1], Path(sys.argv[2]).resolve()
    root = Path(sys.argv[3]).resolve() if len(sys.argv) > 3 else bundle.parent
    if command == "split":
        split(bundle, root)
    elif command == "runbook":
        print(runbook(bundle, root))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
