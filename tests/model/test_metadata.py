import json

import pytest

from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.metadata import AdapterMetadata, adapter_identity, read_metadata
from sentiment_ray.model.prompt import PromptSpec


def _adapter(folder, weights=b"w1"):
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    meta = AdapterMetadata(
        base_model="/models/base", backend="hf",
        prompt=PromptSpec(template="Text: {text}\nMood:", label_words=(" bad", " good"), max_length=99),
        label_token_ids=[11, 12], data={"fingerprint": "abc", "rows": 3}, metrics={"train_loss": 0.5},
    )
    meta.write(folder)
    return meta


def test_round_trip(tmp_path):
    written = _adapter(tmp_path / "a")
    read = read_metadata(tmp_path / "a")
    assert read == written
    assert read.prompt.label_words == (" bad", " good") and read.prompt.max_length == 99
    data = json.loads((tmp_path / "a" / "sentiment_ray.json").read_text())
    assert data["package_version"] and data["label_token_ids"] == [11, 12]


def test_identity_follows_the_weights(tmp_path):
    _adapter(tmp_path / "a", b"w1")
    _adapter(tmp_path / "b", b"w1")
    _adapter(tmp_path / "c", b"w2")
    a, b, c = (adapter_identity(tmp_path / n) for n in "abc")
    assert a.startswith("a@") and a.split("@")[1] == b.split("@")[1] != c.split("@")[1]


def test_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_metadata(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has no sentiment_ray.json"):
        read_metadata(tmp_path / "empty")


def test_pickle_weights_are_not_accepted(tmp_path):
    _adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        read_metadata(tmp_path / "a")


def test_unknown_format_version(tmp_path):
    _adapter(tmp_path / "a")
    path = tmp_path / "a" / "sentiment_ray.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterError, match="format_version 99"):
        read_metadata(tmp_path / "a")


# ---------------------------------------------------------------------------------- checks before work starts


def _copy(adapter, tmp_path):
    import shutil

    return shutil.copytree(adapter, tmp_path / "adapter")


def test_a_sound_adapter_and_its_recorded_base_pass_the_check(random_adapter, tiny_model_dir):
    from sentiment_ray.model.metadata import check_adapter_loadable

    assert check_adapter_loadable(random_adapter).base_model == str(tiny_model_dir)
    assert check_adapter_loadable(random_adapter, base_override=str(tiny_model_dir)).base_model == str(tiny_model_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_adapter_weights_are_named(random_adapter, tmp_path, damage):
    from sentiment_ray.model.metadata import check_adapter_loadable

    weights = _copy(random_adapter, tmp_path) / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file",
                         "empty": b""}[damage])
    with pytest.raises(AdapterError, match=rf"^{weights}: not readable safetensors \(.*header.*\); the file is "
                                           "truncated or damaged"):
        check_adapter_loadable(weights.parent)


def test_missing_base_model_is_named_with_where_it_was_recorded(random_adapter, tmp_path):
    from sentiment_ray.model.metadata import check_adapter_loadable

    adapter = _copy(random_adapter, tmp_path)
    recorded = json.loads((adapter / "sentiment_ray.json").read_text())
    recorded["base_model"] = str(tmp_path / "gone" / "base")
    (adapter / "sentiment_ray.json").write_text(json.dumps(recorded))
    with pytest.raises(AdapterError) as caught:
        check_adapter_loadable(adapter)
    assert str(caught.value) == (f"base model {tmp_path / 'gone' / 'base'} recorded in {adapter / 'sentiment_ray.json'}"
                                 " cannot be found: no such folder; pass --base-model to name it")


def test_base_model_override_must_be_a_model_folder_or_a_resolvable_hub_id(random_adapter, tmp_path):
    from sentiment_ray.model.metadata import check_adapter_loadable, check_base_model

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(AdapterError, match=r"not-a-model has no config\.json; check --base-model"):
        check_adapter_loadable(random_adapter, base_override=str(tmp_path / "not-a-model"))
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    (tmp_path / "not-a-model" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match=r"has no \*\.safetensors weights"):
        check_base_model(str(tmp_path / "not-a-model"))
    # a hub id that is neither a local folder nor in the cache (the tests run with HF_HUB_OFFLINE=1)
    with pytest.raises(AdapterError, match=r"^base model nobody/no-such-model-xyz cannot be found: \w+"):
        check_base_model("nobody/no-such-model-xyz")


def test_an_adapter_written_before_base_model_id_still_reads(tmp_path):
    """Metadata without the newer fields (base_model_id, command) reads as they were unknown."""
    _adapter(tmp_path / "a")
    path = tmp_path / "a" / "sentiment_ray.json"
    data = json.loads(path.read_text())
    for newer in ("base_model_id", "command"):
        del data[newer]
    path.write_text(json.dumps(data))
    read = read_metadata(tmp_path / "a")
    assert read.base_model_id is None and read.command is None and read.base_model == "/models/base"


# The weights against their own adapter_config.json and the base model: read from the safetensors header and the
# base built on the meta device, so that peft's `size mismatch` is not found inside every actor.


def _rewrite_weights(adapter, rename):
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    save_file({rename(k): v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})


def _set_adapter_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_weights_of_another_rank_than_their_config_are_named(random_adapter, tmp_path):
    from sentiment_ray.model.metadata import check_adapter_loadable

    adapter = _copy(random_adapter, tmp_path)
    _set_adapter_config(adapter, r=8)  # the weights are rank 4
    with pytest.raises(AdapterError, match=rf"^{adapter}/adapter_model\.safetensors: LoRA rank 4 weights \(base_model"
                                           rf"\.model\.model\.layers\.0\.\S+\.lora_[AB]\.weight is \[.*\]\), but "
                                           rf"{adapter}/adapter_config\.json says r: 8 for that module; the weights "
                                           "do not match their own config"):
        check_adapter_loadable(adapter)


def test_weights_for_modules_the_base_or_the_config_lacks_are_named(random_adapter, tiny_model_dir, tmp_path):
    from sentiment_ray.model.metadata import check_adapter_loadable

    adapter = _copy(random_adapter, tmp_path)
    _set_adapter_config(adapter, target_modules=["q_proj", "v_proj"])  # the weights have down_proj too
    with pytest.raises(AdapterError, match=r"holds LoRA weights for model\.layers\.0\.mlp\.down_proj, which "
                                           r".*adapter_config\.json does not target"):
        check_adapter_loadable(adapter)
    _set_adapter_config(adapter, target_modules=["q_proj", "v_proj", "down_proj", "k_proj"])
    with pytest.raises(AdapterError, match=r"has no weights for 4 LoRA matrices that .*adapter_config\.json asks "
                                           r"for \(e\.g\. .*k_proj\.lora_A\.weight\)"):
        check_adapter_loadable(adapter)
    _set_adapter_config(adapter, target_modules=["q_proj", "v_proj", "down_proj"])
    _rewrite_weights(adapter, lambda k: k.replace("layers.1.", "layers.7."))  # the tiny base has 2 layers
    with pytest.raises(AdapterError, match=r"holds base_model\.model\.model\.layers\.7\.\S+, for module "
                                           rf"model\.layers\.7\.\S+, which base model {tiny_model_dir} "
                                           r"\(MistralForCausalLM\) does not have: the adapter was trained on "
                                           "another base model; pass --base-model"):
        check_adapter_loadable(adapter)
    _set_adapter_config(adapter, target_modules=["qkv_proj"])
    with pytest.raises(AdapterError, match=r"adapter_config\.json: target_modules \['qkv_proj'\] name no module of "
                                           "base model"):
        check_adapter_loadable(adapter)


def test_weights_of_another_base_models_size_are_named(random_adapter, tiny_model_dir, tmp_path):
    """An adapter trained on a wider base: its matrices cannot fit this base's modules."""
    import torch
    from safetensors.torch import load_file, save_file

    from sentiment_ray.model.metadata import check_adapter_loadable

    adapter = _copy(random_adapter, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    save_file({k: torch.zeros(v.shape[0] * (2 if "lora_B" in k else 1), v.shape[1] * (2 if "lora_A" in k else 1))
               for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=rf"^{weights}: base_model\.model\.\S+ is \[\d+, \d+\], but base model "
                                           rf"{tiny_model_dir} makes it \[\d+, \d+\]: the adapter was trained on "
                                           "another base model; pass --base-model with that one$"):
        check_adapter_loadable(adapter)
