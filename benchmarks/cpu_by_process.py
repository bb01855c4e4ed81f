"""Where a command's CPU time goes, by kind of process (issue 30's CI time): runs the command, looks at every
process on the machine every `--every` seconds (/proc/<pid>/stat and cmdline), and prints the CPU seconds each
kind of process used, with how many there were (a scoring actor, a Ray Train worker, a GCS, a test process ...).

    python benchmarks/cpu_by_process.py -- python -m pytest -n 2 --dist loadfile -p no:cacheprovider
    python benchmarks/cpu_by_process.py --json suite.json -- make test

A process is counted by the CPU it had used when last seen, under the name it last had (Ray renames a worker
`ray::IDLE` between tasks, `ray::<Actor>` for an actor's life): one that lives less than `--every` seconds may be
missed, and a task worker counts as `ray::IDLE`, whatever it ran. Processes that were running before the command
started count only what they used after it. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _read(pid: str) -> tuple[str, float, str] | None:
    """(key: pid and start time, CPU seconds, command line) of a user process, None for a kernel thread or one
    gone meanwhile."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if not cmdline and fields[1] == "2":  # a kernel thread (its parent is kthreadd)
        return None
    return f"{pid}-{fields[19]}", (int(fields[11]) + int(fields[12])) / TICKS, cmdline


def sample(seen: dict, baseline: dict) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or (read := _read(pid)) is None:
            continue
        key, cpu, cmdline = read
        entry = seen.setdefault(key, {"cpu": 0.0, "cmdline": cmdline, "before": baseline.get(key, 0.0)})
        entry["cpu"] = max(entry["cpu"], cpu)
        if cmdline:  # a zombie has none: keep its last name
            entry["cmdline"] = cmdline


KINDS = [  # (pattern on the command line, kind); the first that matches
    (r"^ray::([A-Za-z_]+(\([^ ]*\))?)", None),  # a Ray worker: its title (actor class, task, IDLE)
    (r"default_worker\.py", "ray worker (starting)"),
    (r"gcs_server", "Ray GCS"), (r"/raylet ", "Ray raylet"), (r"log_monitor\.py", "Ray log monitor"),
    (r"dashboard/agent\.py|DashboardAgent", "Ray dashboard agent"), (r"runtime_env/agent", "Ray runtime env agent"),
    (r"dashboard/dashboard\.py|ray-dashboard-", "Ray dashboard"), (r"autoscaler/_private/monitor|monitor\.py",
                                                                  "Ray autoscaler monitor"),
    (r"exec\(eval\(sys\.stdin|pytest", "pytest process"), (r"-m tests\.", "cluster scenario driver"),
    (r"sentiment_ray\.cli|jobs/(score|finetune)\.py", "a command in a subprocess"), (r"moto_server", "moto S3"),
    (r"cc1plus|/gcc", "C++ compiler (torch inductor)"),
]


def kind_of(cmdline: str) -> str:
    for pattern, kind in KINDS:
        if found := re.search(pattern, cmdline):
            return kind or "ray::" + re.sub(r"\.(submit|__init__|__call__|run)$", "", found.group(1))
    return "other: " + cmdline[:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=2.0, help="seconds between two looks at the processes")
    parser.add_argument("--json", help="also write every process seen, with its CPU seconds, to this file")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    before: dict[str, dict] = {}
    sample(before, {})
    baseline = {key: entry["cpu"] for key, entry in before.items()}
    seen: dict[str, dict] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            sample(seen, baseline)
            done.wait(args.every)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.time()
    watcher.start()
    returncode = subprocess.call(command)
    done.set()
    watcher.join()
    sample(seen, baseline)
    wall = time.time() - started

    me = f"{os.getpid()}-"
    by_kind: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for key, entry in seen.items():
        used = entry["cpu"] - entry["before"]
        if key.startswith(me) or used <= 0:
            continue
        kind = by_kind[kind_of(entry["cmdline"])]
        kind[0] += 1
        kind[1] += used
    total = sum(cpu for _, cpu in by_kind.values())
    print(f"{' '.join(command)}: exit {returncode}, {wall:.0f} s wall, {total:.0f} CPU-s in the processes seen")
    print(f"| {'kind of process':<52} | processes | CPU-s | share | CPU-s each |")
    print(f"|{'-' * 54}|-----------|-------|-------|------------|")
    for kind, (count, cpu) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"| {kind:<52} | {count:9d} | {cpu:5.0f} | {100 * cpu / total:4.1f}% | {cpu / count:10.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(seen))
    sys.exit(returncode)


if __name__ == "__main__":
    main()
