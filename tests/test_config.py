from pathlib import Path

import pytest

from sentiment_ray.config import ConfigError, FinetuneConfig, ScoreConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_finetune_config_loads(path):
    cfg = load_config(FinetuneConfig, path)
    assert cfg.output_dir and cfg.data.train


@pytest.mark.parametrize("path", sorted((CONFIGS / "score").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_score_config_loads(path):
    cfg = load_config(ScoreConfig, path, ["input=x.parquet", "output=out"])
    assert cfg.batch_size > 0


def test_reference_config_is_the_seed_setup():
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / "mistral7b_qlora_gpu.yaml")
    assert cfg.model.name_or_path == "unsloth/mistral-7b-v0.3-bnb-4bit"
    assert cfg.model.load_in_4bit and cfg.ray.use_gpu and cfg.lora.r == 16
    assert sorted(cfg.lora.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / "tiny_test.yaml",
                      ["train.epochs=3", "lora.target_modules=[q_proj, v_proj]", "prompt.max_length=100"])
    assert cfg.train.epochs == 3.0 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.prompt.max_length == 100


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("output_dir: a\ndata: {train: x}\ntrain: {epochz: 1}\n", [], r"c\.yaml: unknown key train\.'epochz'"),
    ("output_dir: a\ndata: {train: x}\ntrain: {batch_size: many}\n", [], r"train\.batch_size must be an integer"),
    ("output_dir: a\ndata: {train: x}\ntrain: {batch_size: 0}\n", [], r"train\.batch_size must be > 0"),
    ("output_dir: a\n", [], r"data\.train is required"),
    ("output_dir: a\ndata: {train: x}\nmodel: {backend: tpu}\n", [], r"model\.backend must be one of"),
    ("output_dir: a\ndata: {train: x}\n", ["prompt.template=no slot"], r"exactly once"),
    ("output_dir: a\ndata: {train: x}\n", ["train.epochs"], r"section\.key=value"),
    ("- a list\n", [], r"top level must be a mapping"),
    ("output_dir: a\ndata: {train: x}\n", ["train.checkpoint_steps=-1"], r"train\.checkpoint_steps must be >= 0"),
    ("output_dir: a\ndata: {train: x}\n", ["ray.max_failures=-2"], r"ray\.max_failures must be >= -1"),
    ("output_dir: a\ndata: {train: x}\n", ["ray.checkpoints_to_keep=0"], r"ray\.checkpoints_to_keep must be > 0"),
    ("output_dir: a\ndata: {train: x}\n", ["resume_if_exists=true"],
     r"c\.yaml: resume_if_exists needs ray\.run_name: without it a rerun gets a new Ray Train run"),
    ("output_dir: a\ndata: {train: x}\nray: {run_name: r}\n", ["resume_if_exists=true", "overwrite=true"],
     r"either resume_if_exists .* or overwrite .*, not both"),
    ("output_dir: a\ndata: {train: x}\nmodel: {backend: hf}\n", ["train.padding_free=true"],
     r"c\.yaml: train\.padding_free needs model\.backend unsloth: with the hf backend \(sdpa attention\) each "
     r"review packed into a row would attend to the reviews packed before it"),
])
def test_config_errors_name_the_file_and_key(tmp_path, yaml_text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, _write(tmp_path, yaml_text), overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(FinetuneConfig, "nope.yaml")


def test_score_model_section_defaults_to_the_adapters_base():
    """A YAML `model:` section that sets only dtype must not swap the adapter's base for another model."""
    cfg = load_config(ScoreConfig, None, ["input=x", "output=y", "model.dtype=float32"])
    assert cfg.model.name_or_path == "" and cfg.model.dtype == "float32"


def test_local_ray_leaves_a_cpu_for_ray_data(monkeypatch):
    """Actors that reserve every core would starve Ray Data's read tasks on a small machine."""
    from sentiment_ray.ops import ray_cluster

    monkeypatch.setattr(ray_cluster.os, "cpu_count", lambda: 2)
    assert ray_cluster.local_cpus() == 3
    for path in sorted((CONFIGS / "score").glob("*cpu*.yaml")) + [CONFIGS / "score" / "tiny_test.yaml"]:
        cfg = load_config(ScoreConfig, path, ["input=x", "output=y"])
        assert cfg.pool_size * cfg.num_cpus_per_actor < 3, path.name


def test_id_column_is_unset_unless_named(tmp_path):
    """Unset: "id" when the files have it, else derived ids; a name given is a column the files must have
    (tests/scoring/test_scoring.py), so the shipped configs leave it unset."""
    for path in sorted((CONFIGS / "score").glob("*.yaml")):
        assert load_config(ScoreConfig, path, ["input=x", "output=y"]).id_column is None, path.name
    assert load_config(ScoreConfig, _write(tmp_path, "id_column: review_id\n"), ["input=x", "output=y"]).id_column \
        == "review_id"
    with pytest.raises(ConfigError, match="id_column must be a string"):
        load_config(ScoreConfig, None, ["input=x", "output=y", "id_column=[a]"])


def test_score_resume_if_exists_excludes_overwrite():
    assert load_config(ScoreConfig, None, ["input=x", "output=y", "resume_if_exists=true"]).resume_if_exists
    with pytest.raises(ConfigError, match=r"^pass either resume or resume_if_exists .* or overwrite .*, not both$"):
        load_config(ScoreConfig, None, ["input=x", "output=y", "resume_if_exists=true", "overwrite=true"])


def test_fp8_quantization_is_off_in_every_shipped_config_and_composes_with_the_fast_forward():
    """Off by default until benchmarks/gpu_fp8.py has measured it (issue 27); on, the 7B config's compiled packed
    forward and bf16 base keep loading."""
    for path in sorted((CONFIGS / "score").glob("*.yaml")):
        assert load_config(ScoreConfig, path, ["input=x", "output=y"]).model.quantization == "none", path.name
    cfg = load_config(ScoreConfig, CONFIGS / "score" / "mistral7b_gpu.yaml",
                      ["input=x", "output=y", "model.quantization=fp8"])
    assert cfg.model.quantization == "fp8" and cfg.forward == "compiled_packed" and cfg.model.merge_adapter
    for dtype in ("auto", "bfloat16"):  # auto: bfloat16 on a GPU; on a CPU the actor falls back (one line)
        assert load_config(ScoreConfig, None, ["input=x", "output=y", "model.quantization=fp8",
                                               f"model.dtype={dtype}"]).model.quantization == "fp8"


@pytest.mark.parametrize("overrides, message", [
    (["model.quantization=int4"], r"model\.quantization must be one of \['none', 'fp8'\], got 'int4'"),
    (["model.quantization=fp8", "model.load_in_4bit=true"],
     r"c\.yaml: model\.quantization=fp8 quantizes a bfloat16 base itself; it cannot requantize a 4-bit "
     r"\(bitsandbytes\) base: set model\.load_in_4bit to false, or set model\.quantization=none"),
    (["model.quantization=fp8", "model.backend=unsloth"],
     r"model\.quantization=fp8 replaces transformers' linear layers, which Unsloth's patched layers read directly: "
     r"set model\.backend to hf"),
    (["model.quantization=fp8", "model.dtype=float32"],
     r"model\.quantization=fp8 computes in bfloat16 \(row-wise float8 matmuls give bfloat16 results\), which "
     r"model\.dtype=float32 contradicts: set model\.dtype to bfloat16 or auto, or set model\.quantization=none"),
    (["model.quantization=fp8", "model.dtype=float16"], r"which model\.dtype=float16 contradicts"),
])
def test_fp8_contradictions_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ScoreConfig, _write(tmp_path, "input: x\noutput: y\n"), overrides)
    # The 4-bit score config, asked for fp8 as well: refused before any work, naming the file.
    if "model.load_in_4bit=true" in overrides:
        with pytest.raises(ConfigError, match=r"mistral7b_4bit_gpu\.yaml: model\.quantization=fp8 quantizes"):
            load_config(ScoreConfig, CONFIGS / "score" / "mistral7b_4bit_gpu.yaml",
                        ["input=x", "output=y", "model.quantization=fp8"])


def test_prepare_actors_0_tokenizes_in_tasks_and_a_negative_count_is_refused():
    assert load_config(ScoreConfig, None, ["input=x", "output=y", "prepare_actors=0"]).prepare_actors == 0
    with pytest.raises(ConfigError, match=r"prepare_actors must be >= 0 \(0: tokenize in Ray tasks\), got -1"):
        load_config(ScoreConfig, None, ["input=x", "output=y", "prepare_actors=-1"])
