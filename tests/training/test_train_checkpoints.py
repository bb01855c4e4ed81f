"""Resumable finetuning: a worker killed after a checkpoint, and a rerun after the driver gave up, both finish
the planned steps from the latest checkpoint and train the same adapter as a run that was never interrupted."""

import dataclasses
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sentiment_ray.config import FinetuneConfig, load_config
from sentiment_ray.io.outputs import OutputExistsError
from sentiment_ray.model.metadata import read_metadata
from sentiment_ray.ops.faults import MARKER, TRAIN_EXIT_AT_STEP
from sentiment_ray.training.checkpoints import ResumeMismatchError, claim_run, run_identity
from sentiment_ray.training.job import run_finetune
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(600)

PLANNED_STEPS = 8  # 64 rows, batch 8, one epoch
CHECKPOINT_STEPS = 3
EXIT_AT_STEP = 5  # after the checkpoint of step 3, before the one of step 6


def _config(tiny_model_dir, train_file, tmp_path, name, *extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}", f"output_dir={tmp_path / name}",
        "data.limit=64", "train.batch_size=8", "train.epochs=1", "train.learning_rate=0.005",
        f"train.checkpoint_steps={CHECKPOINT_STEPS}", f"ray.storage_path={tmp_path / 'ray-results'}",
        f"ray.run_name={name}", *extra,
    ])


def _weights(result) -> dict:
    return load_file(f"{result['adapter_dir']}/adapter_model.safetensors")


def _assert_same_adapter(resumed, uninterrupted):
    a, b = _weights(resumed), _weights(uninterrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_model_dir, synthetic_train_file, tmp_path_factory):
    cfg = _config(tiny_model_dir, synthetic_train_file, tmp_path_factory.mktemp("uninterrupted"), "uninterrupted")
    result = run_finetune(cfg)
    result["config"] = cfg
    return result


def test_uninterrupted_run_reports_no_resume(uninterrupted):
    assert uninterrupted["metrics"]["steps"] == PLANNED_STEPS
    assert uninterrupted["metrics"]["resumed_from_step"] == 0


# A worker killed mid-training and restarted by Ray Train from the last checkpoint, giving the adapter of the run
# that never died: tests/training/test_train_distributed.py kills one worker of two, which restarts the whole group
# the same way; the rerun below resumes a one-worker run from its checkpoint.


def test_rerun_after_the_job_failed_resumes_the_same_run(
        ray_session, tiny_model_dir, synthetic_train_file, tmp_path, monkeypatch, uninterrupted):
    # As the KubeRay manifest runs it: a named run with --resume-if-exists, so a retry is the same command line.
    cfg = _config(tiny_model_dir, synthetic_train_file, tmp_path, "rerun", "ray.max_failures=0",
                  "resume_if_exists=true")
    monkeypatch.setenv(TRAIN_EXIT_AT_STEP, str(EXIT_AT_STEP))
    monkeypatch.setenv(MARKER, str(tmp_path / "fault-marker"))
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's error type for a dead worker varies by version
        run_finetune(cfg)
    assert not (tmp_path / "rerun").exists(), "a failed run must not leave an adapter behind"

    monkeypatch.delenv(TRAIN_EXIT_AT_STEP)
    result = run_finetune(cfg)
    assert result["metrics"]["resumed_from_step"] == CHECKPOINT_STEPS
    assert result["metrics"]["steps"] == PLANNED_STEPS
    _assert_same_adapter(result, uninterrupted)

    # Run once more (the job retried after it had finished): the adapter is reported, nothing is trained.
    from sentiment_ray.ops import ray_cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was joined: a finished adapter must be reported without training")

    monkeypatch.setattr(ray_cluster, "ensure_ray", refuse)
    weights = Path(result["adapter_dir"], "adapter_model.safetensors")
    written = weights.stat().st_mtime_ns
    again = run_finetune(cfg)
    assert (again["adapter_dir"], again["metrics"]) == (result["adapter_dir"], result["metrics"])
    assert weights.stat().st_mtime_ns == written
    # With other settings the adapter there is not this run's: refused, never replaced.
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=0.001))
    with pytest.raises(OutputExistsError, match=r"holds an adapter trained with other train than this run's; "
                                                r"pass --overwrite"):
        run_finetune(other)
    assert weights.stat().st_mtime_ns == written


def test_rerun_with_other_settings_is_refused_before_training(ray_session, tiny_model_dir, synthetic_train_file,
                                                               tmp_path, uninterrupted):
    recorded = uninterrupted["config"]  # same run name and storage, another learning rate and output
    cfg = dataclasses.replace(recorded, output_dir=str(tmp_path / "other"),
                              train=dataclasses.replace(recorded.train, learning_rate=0.001))
    with pytest.raises(ResumeMismatchError, match=r"other train .*sentiment_ray_run\.json"):
        run_finetune(cfg)


def test_claim_run_records_the_identity_and_recognises_a_rerun(tmp_path, tiny_model_dir, synthetic_train_file):
    cfg = _config(tiny_model_dir, synthetic_train_file, tmp_path, "claimed")
    identity = run_identity(cfg, "0123456789abcdef")
    assert claim_run(str(tmp_path / "store"), "claimed", identity) is False
    assert claim_run(str(tmp_path / "store"), "claimed", identity) is True
    with pytest.raises(ResumeMismatchError, match="data_fingerprint"):
        claim_run(str(tmp_path / "store"), "claimed", run_identity(cfg, "fedcba9876543210"))


def test_reporting_and_speed_settings_do_not_change_the_identity(tmp_path, tiny_model_dir, synthetic_train_file):
    cfg = _config(tiny_model_dir, synthetic_train_file, tmp_path, "same")
    faster = _config(tiny_model_dir, synthetic_train_file, tmp_path, "same", "train.logging_steps=1",
                     "train.checkpoint_steps=2", "train.torch_threads=1")
    assert run_identity(cfg, "f") == run_identity(faster, "f")
    # The hub id only names the base: a run recorded before model.base_model_id existed still resumes.
    named = _config(tiny_model_dir, synthetic_train_file, tmp_path, "same", "model.base_model_id=org/tiny")
    assert run_identity(cfg, "f") == run_identity(named, "f")
    other = _config(tiny_model_dir, synthetic_train_file, tmp_path, "same", "lora.r=4")
    assert run_identity(cfg, "f") != run_identity(other, "f")


def test_the_identity_recorded_in_an_adapter_is_the_one_of_the_run_that_trained_it(uninterrupted):
    from sentiment_ray.training.checkpoints import recorded_identity

    metadata = read_metadata(uninterrupted["adapter_dir"])
    cfg = uninterrupted["config"]
    model = dataclasses.replace(cfg.model, name_or_path=metadata.base_model)  # resolved by the driver
    assert recorded_identity(metadata) == run_identity(dataclasses.replace(cfg, model=model),
                                                       metadata.data["fingerprint"])
    assert recorded_identity(dataclasses.replace(metadata, training={})) is None  # an older adapter
