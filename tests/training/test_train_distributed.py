"""Finetuning on several Ray Train workers (DDP over gloo on CPU), fed by per-worker Ray Datasets.

Equivalence: two workers with batch b and one worker with batch 2b see the same rows in the same global batches in
the first epoch (sentiment_ray/training/data.py: worker r trains positions r, r+2, ...; its local batch k is one half of
global batch k). DDP averages the two halves' gradients; with one label token per row that is the one-worker mean,
so the adapters differ only by float32 summation order. Tolerance: 1e-4 on every LoRA weight (observed: see
ADAPTER_TOLERANCE) and 1e-4 on the loss.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from sentiment_ray.config import ConfigError, FinetuneConfig, load_config
from sentiment_ray.model.tiny import synthetic_reviews
from sentiment_ray.ops.faults import MARKER, TRAIN_EXIT_AT_STEP
from sentiment_ray.training.data import WorkerBatchSampler, WorkerShare, load_rows, scan_training_data
from sentiment_ray.training.job import run_finetune
from tests.conftest import REPO_ROOT, on_the_session_ray, write_reviews

pytestmark = pytest.mark.timeout(900)

ADAPTER_TOLERANCE = 1e-4
# 130 rows, global batch 16, one epoch: 8 full steps and a last one of 2 rows (1 per worker), which the workers
# must neither pad with rows from the epoch's start nor drop.
PLANNED_STEPS = 9


def _config(tiny_model_dir, train_file, tmp_path, name, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}", f"output_dir={tmp_path / name}",
        "data.limit=130", "train.epochs=1", "train.learning_rate=0.005", "train.checkpoint_steps=3",
        f"ray.storage_path={tmp_path / 'ray-results'}", f"ray.run_name={name}", *extra,
    ])


def _max_difference(a_dir, b_dir) -> float:
    a, b = load_file(f"{a_dir}/adapter_model.safetensors"), load_file(f"{b_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_worker(ray_session, tiny_model_dir, synthetic_train_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-worker")
    return run_finetune(_config(tiny_model_dir, synthetic_train_file, tmp, "one", "train.batch_size=16"))


@pytest.fixture(scope="module")
def two_workers(ray_session, tiny_model_dir, synthetic_train_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-workers")
    return run_finetune(_config(tiny_model_dir, synthetic_train_file, tmp, "two", "train.batch_size=8",
                                "ray.num_workers=2"))


def test_two_workers_train_the_adapter_of_one_worker_with_the_same_global_batch(one_worker, two_workers):
    one, two = one_worker["metrics"], two_workers["metrics"]
    assert (one["steps"], two["steps"]) == (PLANNED_STEPS, PLANNED_STEPS)
    assert (one["global_batch_size"], two["global_batch_size"]) == (16, 16)
    assert (one["num_workers"], two["num_workers"], two["per_device_batch_size"]) == (1, 2, 8)
    assert two["non_padding_tokens"] == one["non_padding_tokens"]  # summed over the workers: the same rows
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-4)
    difference = _max_difference(one_worker["adapter_dir"], two_workers["adapter_dir"])
    print(f"largest LoRA weight difference, 2 workers vs 1: {difference:.2e}")
    assert difference < ADAPTER_TOLERANCE
    assert one_worker["data"]["fingerprint"] == two_workers["data"]["fingerprint"]
    assert two_workers["data"]["num_workers"] == 2 and two_workers["data"]["rows_left_out_for_equal_shards"] == 0


def test_a_killed_worker_of_two_restarts_the_group_from_the_last_checkpoint(
        ray_session, tiny_model_dir, synthetic_train_file, tmp_path, monkeypatch, two_workers):
    marker = tmp_path / "fault-marker"
    monkeypatch.setenv(TRAIN_EXIT_AT_STEP, "5")  # worker 1 dies after the checkpoint of step 3
    monkeypatch.setenv(MARKER, str(marker))
    result = run_finetune(_config(tiny_model_dir, synthetic_train_file, tmp_path, "killed", "train.batch_size=8",
                                  "ray.num_workers=2", "ray.max_failures=1"))
    assert marker.exists(), "the worker never reached the fault"
    assert result["metrics"]["resumed_from_step"] == 3
    assert result["metrics"]["steps"] == PLANNED_STEPS
    # The same rows in the same batches after the restart: the adapter of the run that never died.
    assert _max_difference(result["adapter_dir"], two_workers["adapter_dir"]) < 1e-5


# --- the driver's pass over the data, and the order of each worker's rows -----------------------------


def test_the_streaming_pass_agrees_with_loading_the_rows(tiny_model_dir, tmp_path):
    texts, labels = synthetic_reviews(300, seed=4)
    long = " ".join(f"word{i}" for i in range(80))
    texts = [f"{t} {long}" for t in texts]
    write_reviews(tmp_path / "a.parquet", texts[:120], labels[:120])
    write_reviews(tmp_path / "b.parquet", texts[120:], labels[120:])
    cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"data.train={tmp_path}", f"output_dir={tmp_path / 'out'}", "data.limit=200", "data.calibration_rows=40",
        "data.excerpt_share=0.3"])
    scanned = scan_training_data(cfg)
    loaded_texts, loaded_labels, info, held_out = load_rows(cfg)
    assert scanned.info == info and scanned.held_out == held_out
    assert info["rows"] == 200 and 30 < info["excerpts"] < 90 and len(held_out.texts) == 40
    # Positions: every input row has one; held-out first, then the training rows in load_rows' order.
    by_place = np.argsort(scanned.order.positions)
    assert [texts[g] for g in by_place[:40]] == held_out.texts
    assert [labels[g] for g in by_place[40:240]] == loaded_labels


def test_an_hf_dataset_loaded_on_the_driver_gets_the_same_order_and_fingerprint(tmp_path, monkeypatch):
    from sentiment_ray.training import data as train_data

    texts, labels = synthetic_reviews(50, seed=5)
    path = write_reviews(tmp_path / "rows.parquet", texts, labels)
    monkeypatch.setattr(train_data, "load_labeled_hf", lambda *args: (texts, labels))
    overrides = [f"output_dir={tmp_path / 'out'}", "data.limit=30", "data.calibration_rows=10"]
    config = REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml"
    from_hub = scan_training_data(load_config(FinetuneConfig, config, ["data.train=hf:example/reviews", *overrides]))
    from_parquet = scan_training_data(load_config(FinetuneConfig, config, [f"data.train={path}", *overrides]))
    assert from_hub.info["fingerprint"] == from_parquet.info["fingerprint"]
    assert from_hub.held_out == from_parquet.held_out
    assert from_hub.hf_table.column("position").to_pylist() == list(range(30))


def test_each_worker_holds_every_n_th_row_and_its_batches_are_slices_of_the_global_batch():
    shares = [WorkerShare.of(11, rank, 2) for rank in range(2)]
    assert [s.rows for s in shares] == [5, 5]  # one row left out: equal shares
    t = np.arange(11)
    assert [list(t[s.keeps(t)]) for s in shares] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    epoch = [0.0]
    sampler = WorkerBatchSampler(5, 2, seed=1, epoch=lambda: epoch[0])
    assert list(sampler) == [[0, 1], [2, 3], [4]] and len(sampler) == 3
    epoch[0] = 1.4  # a run resumed in its second epoch: that epoch's order, the same on every worker
    second = list(sampler)
    assert sorted(sum(second, [])) == [0, 1, 2, 3, 4] and second == list(WorkerBatchSampler(5, 2, 1, lambda: 1.0))


def test_group_by_length_groups_each_workers_rows_every_epoch():
    lengths = [(7 * i) % 23 for i in range(250)]
    epoch = [0.0]
    sampler = WorkerBatchSampler(250, 2, seed=3, epoch=lambda: epoch[0], lengths=lengths)
    first = list(sampler)
    assert len(first) == len(sampler) == 125 and sorted(sum(first, [])) == list(range(250))
    assert max(lengths[i] for i in first[0]) == max(lengths)  # the longest batch first
    # Within each megabatch of 50 batches the rows run longest first (the swapped-in first batch aside).
    flat = [lengths[i] for batch in first[1:50] for i in batch]
    assert flat == sorted(flat, reverse=True)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in first)
    random_padding = sum(2 * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                         for b in WorkerBatchSampler(250, 2, seed=3, epoch=lambda: 0.0))
    assert padding < random_padding / 3
    epoch[0] = 1.0
    second = list(sampler)
    assert second != first and sorted(sum(second, [])) == list(range(250))
    assert second == list(WorkerBatchSampler(250, 2, 3, lambda: 1.0, lengths))  # the same on every worker


def test_two_workers_train_length_grouped_batches(ray_session, tiny_model_dir, synthetic_train_file, tmp_path,
                                                  two_workers):
    result = run_finetune(_config(tiny_model_dir, synthetic_train_file, tmp_path, "grouped", "train.batch_size=8",
                                  "ray.num_workers=2", "train.group_by_length=true"))
    assert result["metrics"]["steps"] == PLANNED_STEPS
    # Every row once in the epoch, in other batches: the same tokens, another adapter.
    assert result["metrics"]["non_padding_tokens"] == two_workers["metrics"]["non_padding_tokens"]
    assert _max_difference(result["adapter_dir"], two_workers["adapter_dir"]) > 1e-4


def test_zero_workers_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="ray.num_workers must be > 0"):
        _config(tiny_model_dir, tmp_path / "x.parquet", tmp_path, "x", "ray.num_workers=0")


def test_the_number_of_workers_is_part_of_the_run_identity(tiny_model_dir, tmp_path):
    from sentiment_ray.model.metadata import AdapterMetadata
    from sentiment_ray.training.checkpoints import recorded_identity, run_identity

    one = _config(tiny_model_dir, tmp_path / "x.parquet", tmp_path, "x")
    two = _config(tiny_model_dir, tmp_path / "x.parquet", tmp_path, "x", "ray.num_workers=2")
    assert "num_workers" not in run_identity(one, "f")  # runs recorded before ray.num_workers keep their identity
    assert run_identity(two, "f") == {**run_identity(one, "f"), "num_workers": 2}
    model = {k: v for k, v in dataclasses.asdict(two.model).items() if k != "base_model_id"}  # read on any base
    metadata = AdapterMetadata(base_model="b", backend="hf", prompt=two.prompt, label_token_ids=[1, 2],
                               lora=dataclasses.asdict(two.lora), data={"fingerprint": "f"},
                               training={**dataclasses.asdict(two.train), "model": model}, metrics={"num_workers": 2})
    assert recorded_identity(metadata) == run_identity(two, "f")
    assert recorded_identity(dataclasses.replace(metadata, metrics={})) == run_identity(one, "f")


# --- the driver's memory does not grow with the rows ---------------------------------------------------

# One process, the sizes in turn: ru_maxrss is the peak of the process's whole life (KiB on Linux), so a driver
# that held the rows would peak higher after the larger file.
# The driver's whole part of a finetune but the wait on the workers: the checks and the scan of the data, the
# training order, the worker datasets (their plans; the rows are read by Ray tasks, not here). Training itself adds
# nothing on the driver that grows with the rows (tests/training/test_train.py trains through the same path).
RSS_SCRIPT = """
import json, resource, sys
import ray
from sentiment_ray.config import FinetuneConfig, load_config
from sentiment_ray.training.data import worker_datasets
from sentiment_ray.training.job import check_before_training
ray.init(address=sys.argv[2], log_to_driver=False)  # the test session's Ray
peaks = []
for train_file in sys.argv[5:]:
    cfg = load_config(FinetuneConfig, sys.argv[3], [f"model.name_or_path={sys.argv[1]}", f"data.train={train_file}",
        f"output_dir={sys.argv[4]}/adapter-{len(peaks)}", "data.limit=null", "ray.num_workers=2"])
    plan = check_before_training(cfg)
    datasets = worker_datasets(plan.training, plan.cfg)
    assert plan.data_info["rows"] > 0 and len(datasets) == 2
    del plan, datasets
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
ray.shutdown()
print("RSS " + json.dumps(peaks))
"""

WORDS = np.array(["good", "bad", "great", "awful", "fine", "dull", "film", "plot", "acting", "story", "music",
                  "scenes", "end"])


def _synthetic_parquet(path: Path, rows: int) -> Path:
    """`rows` reviews of 40 words (~250 bytes), written in chunks of 20k rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 20_000):
            n = min(20_000, rows - start)
            words = WORDS[rng.integers(0, len(WORDS), size=(n, 40))]
            writer.write_table(pa.table({"text": [" ".join(w) for w in words], "label": rng.integers(0, 2, n)},
                                        schema=schema))
    return path


def _driver_peak_rss(ray_session, tiny_model_dir, train_files: list[Path], work: Path) -> list[int]:
    """The driver's peak RSS after finetuning on each file in turn, in one process (joining the session's Ray):
    a driver that held the rows would peak higher after a larger file (ru_maxrss only grows)."""
    env, address = on_the_session_ray(ray_session)
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tiny_model_dir), address,
                           str(REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml"), str(work),
                           *map(str, train_files)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RSS "))
    return json.loads(line[4:])


def test_the_driver_memory_does_not_grow_with_the_training_rows(ray_session, tiny_model_dir, tmp_path):
    small, large = _driver_peak_rss(ray_session, tiny_model_dir,
                                    [_synthetic_parquet(tmp_path / "rows20k.parquet", 20_000),
                                     _synthetic_parquet(tmp_path / "rows200k.parquet", 200_000)], tmp_path)
    mb = 2**20
    print(f"driver peak RSS: after 20k rows {small / mb:.0f} MB, after 200k rows {large / mb:.0f} MB "
          f"(200k rows of text: ~{200_000 * 250 / mb:.0f} MB)")
    # The driver holds ~17 bytes per row (position, digest, label): 3 MB more at 200k than at 20k.
    assert large - small < 50 * mb
