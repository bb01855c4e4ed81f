"""The embedded model's conversion: gguf's parsing memoised while it runs, and only then. (The conversion itself, of
the real SmolLM2 wheel, runs once per test run in the `embedded_model` fixture: the demo and export tests check what
it built, its label tokens and its scores.)"""

import gguf
import numpy as np
import pytest

from sentiment_ray.model.embedded import _gguf_parsed_once


def _tiny_gguf(path) -> str:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_within_a_conversion_each_file_is_parsed_once_and_each_name_map_built_once(tmp_path):
    first, second = _tiny_gguf(tmp_path / "a.gguf"), _tiny_gguf(tmp_path / "b.gguf")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        from gguf import GGUFReader, get_tensor_name_map  # as transformers imports them, inside its functions

        assert GGUFReader(first) is GGUFReader(first) and GGUFReader(second) is not GGUFReader(first)
        assert GGUFReader(first).fields["tokenizer.ggml.eos_token_id"].contents() == 2
        llama = gguf.MODEL_ARCH.LLAMA
        assert get_tensor_name_map(llama, 2) is get_tensor_name_map(llama, 2)
        assert get_tensor_name_map(llama, 3) is not get_tensor_name_map(llama, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(first) is not gguf.GGUFReader(first)  # outside a conversion, gguf as it is

    with pytest.raises(RuntimeError), _gguf_parsed_once():
        raise RuntimeError("a conversion that fails")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
