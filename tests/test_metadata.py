import json

import pytest

from sentiment_ray.metadata import AdapterError, AdapterMetadata, adapter_identity, read_metadata
from sentiment_ray.prompt import PromptSpec


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
