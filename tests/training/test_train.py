"""The finetune job on the tiny model, through Ray Train, then scored: proves labels, masks and scoring agree."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentiment_ray.config import ConfigError, FinetuneConfig, ModelConfig, load_config
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.outputs import OutputExistsError, OutputNotWritableError
from sentiment_ray.model.metadata import METADATA_FILE, read_metadata
from sentiment_ray.model.scorer import SentimentScorer
from sentiment_ray.model.tiny import synthetic_reviews
from sentiment_ray.ops.signals import Terminated
from sentiment_ray.training.job import load_training_rows, run_finetune
from tests.conftest import REPO_ROOT, write_reviews

pytestmark = pytest.mark.timeout(600)


def _config(tiny_model_dir, train_file, output_dir, *extra):
    return load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}", f"output_dir={output_dir}",
        "data.limit=null", *extra,
    ])


@pytest.fixture(scope="module")
def trained(ray_session, tiny_model_dir, synthetic_train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "adapter"
    # base_model_id: as for a local copy of a hub model. The learning check below then also shows that scoring
    # loads the base from the local path in the metadata, not from the hub id in adapter_config.json (offline).
    cfg = _config(tiny_model_dir, synthetic_train_file, out, "train.epochs=4", "train.batch_size=16",
                  "train.learning_rate=0.005", "lora.r=8", "lora.alpha=16", "data.calibration_rows=64",
                  "model.base_model_id=example-org/tiny-random-mistral")
    return run_finetune(cfg, command="sentiment-ray finetune --config tiny_test.yaml"), cfg


def test_learning_check_reaches_90_percent_on_separable_data(trained, tiny_model_dir):
    result, _ = trained
    texts, labels = synthetic_reviews(200, seed=99)  # held out: another seed than the training rows
    scorer = SentimentScorer.from_adapter(result["adapter_dir"],
                                          ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    scores = scorer.score_texts(texts).scores
    accuracy = sum(int(s >= 0.5) == y for s, y in zip(scores, labels)) / len(labels)
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f} after finetuning; loss {result['metrics']['train_loss']}"


def test_adapter_folder_and_metadata(trained, synthetic_train_file, tiny_model_dir):
    result, cfg = trained
    folder = result["adapter_dir"]
    meta = read_metadata(folder)
    assert meta.base_model == str(tiny_model_dir)
    assert meta.prompt == cfg.prompt and meta.backend == "hf"
    assert meta.data["rows"] == 192 and meta.data["files"] == [str(synthetic_train_file)]  # 64 held out
    assert meta.data["calibration_rows"] == 64 and len(meta.data["fingerprint"]) == 16
    assert meta.metrics["steps"] == 48 and meta.metrics["train_loss"] > 0
    assert meta.metrics["first_step_seconds"] > 0 and meta.metrics["steady_tokens_per_second"] > 0
    folder = Path(folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["base_model_name_or_path"] == "example-org/tiny-random-mistral"
    assert meta.base_model_id == "example-org/tiny-random-mistral"
    card = (folder / "README.md").read_text()  # the model card, with what made the adapter
    assert card.startswith("---\nlibrary_name: peft\nbase_model: example-org/tiny-random-mistral\n")
    assert meta.data["fingerprint"] in card and f"| train_loss | {meta.metrics['train_loss']} |" in card
    assert "sentiment-ray finetune --config tiny_test.yaml" in card
    assert (folder / "adapter_model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only


def test_the_temperature_is_fitted_on_the_held_out_rows_and_scoring_applies_it(trained, synthetic_train_file,
                                                                             tiny_model_dir):
    from sentiment_ray.training.calibration import fit_temperature

    result, cfg = trained
    meta = read_metadata(result["adapter_dir"])
    fit = meta.metrics["calibration"]
    assert fit["rows"] == 64 and meta.temperature == pytest.approx(fit["temperature"], abs=1e-6)
    assert fit["nll_after"] <= fit["nll_before"] and meta.temperature != 1.0
    # Refit from outside, on the same held-out rows (the first 64 after the seeded shuffle), with the scorer the
    # jobs use: the same temperature, so the worker fitted on the rows it names.
    texts, labels = pq.read_table(synthetic_train_file).column("text").to_pylist(), []
    labels = pq.read_table(synthetic_train_file).column("label").to_pylist()
    from sentiment_ray.training.data import shuffled_positions

    order = np.argsort(shuffled_positions(len(texts), cfg.data.shuffle_seed))  # input row at each position
    scorer = SentimentScorer.from_adapter(result["adapter_dir"],
                                          ModelConfig(name_or_path="", backend="hf", dtype="float32"))
    assert scorer.temperature == meta.temperature
    margins = scorer.logit_margins([texts[i] for i in order[:64]])
    refit = fit_temperature(margins, [labels[i] for i in order[:64]])
    assert refit.temperature == pytest.approx(meta.temperature, rel=1e-3)


def test_held_out_rows_cannot_take_every_row(tiny_model_dir, synthetic_train_file, tmp_path, ray_must_not_start):
    with pytest.raises(InputError, match=r"data\.calibration_rows=256 holds out all 256 rows"):
        run_finetune(_config(tiny_model_dir, synthetic_train_file, tmp_path / "adapter", "data.calibration_rows=256"))


def test_peft_loads_the_adapter_as_it_is(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained[0]["adapter_dir"])
    assert model.peft_config["default"].r == 8


def test_existing_output_is_not_overwritten(trained, tiny_model_dir, synthetic_train_file):
    cfg = _config(tiny_model_dir, synthetic_train_file, trained[0]["adapter_dir"])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_finetune(cfg)


# --- checks on the driver, before Ray starts -------------------------------------------------------------


def test_an_empty_training_set_is_refused_before_ray_starts(tiny_model_dir, tmp_path, ray_must_not_start):
    empty = write_reviews(tmp_path / "empty.parquet", pa.array([], pa.string()), pa.array([], pa.int64()), ids=[])
    with pytest.raises(InputError, match=rf"^{empty}: no training rows \(its 1 Parquet file\(s\) hold 0 rows\); "
                                         "finetuning needs at least one labeled review$"):
        run_finetune(_config(tiny_model_dir, empty, tmp_path / "adapter"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet"]


def test_a_share_of_training_rows_becomes_excerpts_of_themselves(tiny_model_dir, tmp_path):
    review = " ".join(f"word{i}" for i in range(200))
    path = write_reviews(tmp_path / "long.parquet", [f"{review} r{i}" for i in range(400)], [i % 2 for i in range(400)])
    whole_texts, whole_labels, whole = load_training_rows(_config(tiny_model_dir, path, tmp_path / "a"))
    texts, labels, info = load_training_rows(_config(tiny_model_dir, path, tmp_path / "a", "data.excerpt_share=0.25"))
    short = [i for i, t in enumerate(texts) if t != whole_texts[i]]
    assert labels == whole_labels and len(texts) == 400  # same rows, same labels: only their text is cut
    assert len(short) == info["excerpts"] and 70 < len(short) < 130 and info["excerpt_share"] == 0.25
    assert all(8 <= len(texts[i].split()) <= 60 and texts[i] in whole_texts[i] for i in short)
    assert info["fingerprint"] != whole["fingerprint"]  # the data the adapter trains on is what its metadata names
    with pytest.raises(ConfigError, match=r"data\.excerpt_share must be in \[0, 1\], got 1\.5"):
        _config(tiny_model_dir, path, tmp_path / "a", "data.excerpt_share=1.5")


def test_one_class_only_is_warned_about(tiny_model_dir, tmp_path, caplog):
    path = write_reviews(tmp_path / "pos.parquet", ["great", "superb", "loved it"], ["positive"] * 3)
    with caplog.at_level(logging.WARNING, logger="sentiment_ray.training.job"):
        texts, labels, info = load_training_rows(_config(tiny_model_dir, path, tmp_path / "adapter"))
    assert (labels, info["rows"]) == ([1, 1, 1], 3)
    assert caplog.messages == [f"{path}: all 3 training rows are positive; the adapter will learn that one class only"]
    caplog.clear()
    both = write_reviews(tmp_path / "both.parquet", ["great", "awful"], [1, 0])
    with caplog.at_level(logging.WARNING, logger="sentiment_ray.training.job"):
        load_training_rows(_config(tiny_model_dir, both, tmp_path / "adapter"))
    assert caplog.messages == []


def test_invalid_utf8_text_is_refused_naming_file_column_and_row(tiny_model_dir, tmp_path, ray_must_not_start):
    path = tmp_path / "train.parquet"
    texts = pa.array([b"a fine film", b"caf\xe9 au lait", b"ok"], pa.binary()).view(pa.string())  # latin-1 bytes
    pq.write_table(pa.table({"text": texts, "label": [1, 0, 1]}), path)
    with pytest.raises(InputError, match=rf"^{path}: column 'text' row 1: invalid UTF-8 byte 0xe9 at byte "
                                         r"3; fix or drop such rows first$"):
        run_finetune(_config(tiny_model_dir, path, tmp_path / "adapter"))


def test_output_dir_is_checked_before_ray_starts(tiny_model_dir, synthetic_train_file, tmp_path, ray_must_not_start):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.md").write_text("my notes")
    with pytest.raises(OutputExistsError, match=rf"^output {notes} holds 1 entry not written by sentiment-ray, e\.g\. "
                                                rf"ideas\.md; choose another path \(--overwrite replaces only a folder "
                                                rf"holding {METADATA_FILE} or an empty folder\)$"):
        run_finetune(_config(tiny_model_dir, synthetic_train_file, notes, "overwrite=true"))
    assert [p.name for p in notes.iterdir()] == ["ideas.md"] and (notes / "ideas.md").read_text() == "my notes"

    data = tmp_path / "data"
    data.mkdir()
    train = write_reviews(data / "train.parquet", ["good", "bad"], [1, 0])
    with pytest.raises(OutputExistsError, match=rf"^output {data / 'adapter'} lies inside the training data {data};"):
        run_finetune(_config(tiny_model_dir, data, data / "adapter"))
    with pytest.raises(OutputExistsError, match=rf"^output {data} contains the training data {train};"):
        run_finetune(_config(tiny_model_dir, data / "*.parquet", data, "overwrite=true"))
    with pytest.raises(OutputNotWritableError, match=r"^output /proc/sr-adapter: cannot write in /proc"):
        run_finetune(_config(tiny_model_dir, synthetic_train_file, "/proc/sr-adapter"))


def test_padding_free_is_refused_when_auto_picks_the_hf_backend(tiny_model_dir, synthetic_train_file, tmp_path):
    # On a machine without CUDA `model.backend: auto` becomes hf, whose sdpa attention would let packed reviews see
    # each other; the check runs again once the backend is known, before any model is loaded.
    from sentiment_ray.training.job import build_trainer

    cfg = _config(tiny_model_dir, synthetic_train_file, tmp_path / "adapter", "model.backend=auto",
                  "train.padding_free=true")
    with pytest.raises(ConfigError, match=r"^train\.padding_free needs model\.backend unsloth"):
        build_trainer(cfg, ["good"], [1], str(tmp_path / "work"))


def test_without_storage_path_checkpoints_go_to_the_cache_and_are_removed_on_success(trained):
    from pathlib import Path

    from sentiment_ray.model.embedded import cache_dir
    from sentiment_ray.training.job import DEFAULT_CHECKPOINTS_DIR

    assert trained[1].ray.storage_path is None
    for storage in (cache_dir() / DEFAULT_CHECKPOINTS_DIR, Path.home() / "ray_results"):
        left = sorted(p.name for p in storage.glob("sentiment-ray-finetune-*")) if storage.exists() else []
        assert left == [], f"{storage} still holds the checkpoints of {left}"


def test_ctrl_c_during_training_asks_the_run_to_stop_and_raises_keyboard_interrupt():
    import signal
    from types import SimpleNamespace

    from ray.train.torch import TorchTrainer

    from sentiment_ray.training.job import interrupt_handler

    assert hasattr(TorchTrainer, "_register_sigint_handler")  # the hook our trainer overrides is still Ray's
    stopped = []
    handler = interrupt_handler(SimpleNamespace(abort=SimpleNamespace(remote=lambda: stopped.append(True))))
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            handler(signal.SIGINT, None)
        assert not isinstance(caught.value, Terminated)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a second Ctrl-C stops at once
        # SIGTERM (KubeRay, `ray job stop`) the same way; the CLI then ends with exit 143 instead of 130
        with pytest.raises(Terminated):
            handler(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM ends the process at once
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)
    assert stopped == [True, True]


def test_a_user_error_in_a_training_worker_is_not_retried_and_reaches_the_driver_as_itself():
    """The driver's checks come first; this is for what only a worker can find: Ray Train would otherwise restart
    the workers ray.max_failures times to meet the same error."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from sentiment_ray.training.job import user_error_inside, user_errors_not_retried

    def failed(error):
        return WorkerGroupError("worker 0 failed", {0: UserExceptionWithTraceback(error, "Traceback ...")})

    policy = user_errors_not_retried(FailureConfig(max_failures=2))
    bad_row = failed(InputError("train.parquet row 3: no text"))
    assert policy.make_decision(bad_row) is FailureDecision.RAISE
    assert str(user_error_inside(bad_row)) == "train.parquet row 3: no text"
    crash = failed(RuntimeError("CUDA error: an illegal memory access"))
    assert policy.make_decision(crash) is FailureDecision.RETRY  # not the user's: retried as before
    assert user_error_inside(crash) is None


def test_target_modules_the_base_does_not_have_are_refused_before_ray_starts(tiny_model_dir, synthetic_train_file,
                                                                              tmp_path, ray_must_not_start):
    """Inside the workers this is peft's NoMatchingPeftModuleError, retried by Ray Train before the command fails."""
    with pytest.raises(ConfigError, match=rf"^lora\.target_modules: qkv_proj, Wqkv are not a module of base model "
                                          rf"{tiny_model_dir} \(MistralForCausalLM\); modules LoRA can adapt there: "
                                          "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                          "up_proj, v_proj$"):
        run_finetune(_config(tiny_model_dir, synthetic_train_file, tmp_path / "adapter",
                             "lora.target_modules=[q_proj, qkv_proj, Wqkv]"))
    assert not (tmp_path / "adapter").exists()


def _a_finished_training_run(monkeypatch, to_directory) -> None:
    """finetune's driver around a TorchTrainer whose run finished (its checkpoints are in Ray Train's storage): the
    adapter checkpoint's to_directory is `to_directory`; no Ray."""
    from types import SimpleNamespace

    from sentiment_ray.ops import ray_cluster
    from sentiment_ray.training import data as train_data
    from sentiment_ray.training import job as train

    class Trained:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return SimpleNamespace(error=None, checkpoint=SimpleNamespace(to_directory=to_directory))

    monkeypatch.setattr(ray_cluster, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(ray_cluster, "check_requests_fit", lambda requests: None)
    monkeypatch.setattr(train_data, "worker_datasets", lambda training, cfg: {})
    monkeypatch.setattr(train, "_interruptible_trainer_class", lambda wait_s, rerun: Trained)


def _finetune_command(tiny_model_dir, train_file, out, storage) -> list[str]:
    return ["finetune", "--config", str(REPO_ROOT / "configs" / "finetune" / "tiny_test.yaml"),
            f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}", f"output_dir={out}",
            f"ray.storage_path={storage}", "ray.run_name=full-disk"]


def test_a_full_disk_while_the_adapter_is_written_is_one_line_exit_1_and_leaves_nothing(
        tiny_model_dir, synthetic_train_file, tmp_path, monkeypatch, capsys):
    """The run trained (its checkpoints are in Ray Train's storage), then the disk fills while the adapter is
    copied out: nothing under output_dir, no half-copied staging folder, and one line naming both."""
    import errno

    from sentiment_ray.cli import main

    def copy_until_the_disk_is_full(folder):
        (Path(folder) / "adapter_model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    _a_finished_training_run(monkeypatch, copy_until_the_disk_is_full)
    out = tmp_path / "models" / "adapter"
    code = main(_finetune_command(tiny_model_dir, synthetic_train_file, out, tmp_path / "storage"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == (
        f"sentiment-ray finetune: error: could not write the adapter to {out}: [Errno 28] No space left on device; "
        "rerun with the same ray.run_name and ray.storage_path to continue from the last checkpoint (without "
        "ray.run_name the run starts over)")
    assert [line for line in err if line.startswith("sentiment-ray ")] == [err[-1]]
    assert list(out.parent.iterdir()) == []  # neither the adapter nor a hidden staging folder


def test_a_store_refusing_the_adapters_upload_is_one_line_exit_1_and_leaves_no_adapter(
        s3_server, tiny_model_dir, synthetic_train_file, tmp_path, monkeypatch, capsys):
    """The same on an object store whose policy denies PutObject under output_dir once the run has started (the
    check before training writes beside it, which stays allowed): one line naming the object and the store's
    error, exit 1; nothing that reads as an adapter (no metadata file) under output_dir."""
    import uuid

    from sentiment_ray.cli import main
    from sentiment_ray.io.storage import location

    def copy_the_adapter(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"weights")
        (Path(folder) / METADATA_FILE).write_text("{}")

    _a_finished_training_run(monkeypatch, copy_the_adapter)
    bucket = s3_server.create_bucket(f"sr-adapter-refused-{uuid.uuid4().hex[:8]}")
    out = f"{bucket}/models/adapter"
    s3_server.deny_writes(f"{out}/*")
    try:
        code = main(_finetune_command(tiny_model_dir, synthetic_train_file, out, tmp_path / "storage"))
    finally:
        s3_server.allow_writes(bucket)
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if line.startswith("sentiment-ray ")]
    assert code == 1 and len(ours) == 1 and re.fullmatch(
        rf"sentiment-ray finetune: error: could not write {out}/\S+: .*AWS Error ACCESS_DENIED during \w+ "
        r"operation.*; this run's result is kept in \S+, and .*; rerun with the same ray.run_name and "
        r"ray.storage_path to continue from the last checkpoint .*", ours[0]), ours
    assert "Traceback" not in "\n".join(err)
    assert not location(out).join(METADATA_FILE).exists()
