"""The users' path: `ray start --head` on free ports in a temp dir, `ray job submit` of both jobs, stop.

The head runs with `--block` and is stopped by signalling that process, which stops exactly the Ray processes
it started: a plain `ray stop` would also kill every other Ray on the machine, the test session's included.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sentiment_ray.model.tiny import synthetic_reviews
from tests.conftest import REPO_ROOT, write_reviews

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_head(head: subprocess.Popen, deadline: float, log: Path, ready, every_s: float) -> None:
    while not ready():
        if head.poll() is not None or time.time() > deadline:
            pytest.fail(f"ray head did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(every_s)


@pytest.fixture
def ray_head(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="sr-head-", dir="/tmp")
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - the head writes it until the teardown stops the head
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--temp-dir={temp_dir}", "--num-cpus=3", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    # The dashboard's port first (a connect costs nothing; each `ray` command costs ~0.7 CPU-s of imports), then
    # the job API through the CLI, as a user would.
    deadline = time.time() + 120
    _wait_for_head(head, deadline, tmp_path / "head.log", lambda: _accepts_connections(dashboard), every_s=0.5)
    _wait_for_head(head, deadline, tmp_path / "head.log", every_s=2, ready=lambda: subprocess.run(
        [RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:  # Ray's graceful stop takes half a minute; this head's jobs are done and its folder goes with it
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        # and any of its processes that left the group: they all name the head's own temp folder
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], check=False)
    shutil.rmtree(temp_dir, ignore_errors=True)
    log.close()


def _submit(address, env, *args):
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
               "--runtime-env", str(REPO_ROOT / "cluster" / "runtime_env.yaml"), "--", sys.executable, *args]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout
    return result.stdout


def test_submit_finetune_then_score(ray_head, tiny_model_dir, tmp_path):
    address, env = ray_head
    texts, labels = synthetic_reviews(64, seed=7)
    train = write_reviews(tmp_path / "train.parquet", texts, labels)
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    for part in range(3):
        write_reviews(reviews / f"p{part}.parquet", texts[part::3],
                      ids=[f"{part}-{i}" for i in range(len(texts[part::3]))])
    adapter, scored = tmp_path / "adapter", tmp_path / "scored"

    _submit(address, env, "jobs/finetune.py", "--config", "configs/finetune/tiny_test.yaml",
            f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"output_dir={adapter}")
    assert json.loads((adapter / "sentiment_ray.json").read_text())["data"]["rows"] == 64

    _submit(address, env, "jobs/score.py", "--config", "configs/score/tiny_test.yaml", "--adapter", str(adapter),
            "--input", str(reviews / "*.parquet"), "--output", str(scored), "model.dtype=float32")
    table = pq.read_table(scored)
    assert table.num_rows == 64 and len(set(table.column("id").to_pylist())) == 64
