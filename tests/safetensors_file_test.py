"""Our safetensors reader and writer against the safetensors package, and on damaged files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import load_file as torch_load_file

from gal_jax.nn import safetensors_file


def _tensors(rng):
    return {
        "conv.weight": rng.standard_normal((6, 5, 3, 3)).astype(np.float32),
        "linear.weight": rng.standard_normal((7, 4)).astype(np.float16),
        "half.bias": rng.standard_normal((9,)).astype(ml_dtypes.bfloat16),
        "ids": rng.integers(0, 100, (3, 2)).astype(np.int64),
        "scalar": np.asarray(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def test_reads_what_the_safetensors_package_writes(tmp_path):
    tensors = {k: v for k, v in _tensors(np.random.default_rng(0)).items() if v.dtype != ml_dtypes.bfloat16}
    file = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})
    with safetensors_file.SafetensorsReader(file) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        assert reader.metadata == {"format": "pt"}
        for key, value in tensors.items():
            np.testing.assert_array_equal(reader.read(key), value)
            assert reader.shape(key) == value.shape and reader.dtype(key) == value.dtype


def test_pytorch_reads_what_we_write_bf16_included(tmp_path):
    tensors = _tensors(np.random.default_rng(1))
    file = safetensors_file.write_arrays(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"})
    loaded = torch_load_file(str(file))
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        got = loaded[key].float().numpy() if loaded[key].dtype == torch.bfloat16 else loaded[key].numpy()
        np.testing.assert_array_equal(got, value.astype(got.dtype))
    assert list(loaded["conv.weight"].shape) == [6, 5, 3, 3]


@pytest.mark.parametrize("seed", range(6))
def test_partial_reads_equal_slices_of_the_whole(tmp_path, seed):
    rng = np.random.default_rng(seed)
    value = rng.standard_normal((5, 4, 3, 6)).astype(np.float32)
    file = safetensors_file.write_arrays(tmp_path / "t.safetensors", {"x": value})
    with safetensors_file.SafetensorsReader(file) as reader:
        for _ in range(20):
            index = []
            for dim in value.shape:
                start = int(rng.integers(0, dim))
                index.append(slice(start, int(rng.integers(start + 1, dim + 1))) if rng.random() < 0.6 else slice(None))
            np.testing.assert_array_equal(reader.read("x", tuple(index)), value[tuple(index)])
        # A part on the leading axis reads exactly its own bytes, nothing on either side.
        np.testing.assert_array_equal(reader.read("x", (slice(1, 3), slice(None), slice(None), slice(None))), value[1:3])


def test_interrupted_write_leaves_the_old_file(tmp_path):
    file = safetensors_file.write_arrays(tmp_path / "w.safetensors", {"a": np.ones(3, np.float32)})
    before = file.read_bytes()

    def produce(key):
        if key == "b":
            raise RuntimeError("killed while writing")
        return np.zeros(4, np.float32)

    with pytest.raises(RuntimeError):
        safetensors_file.write(file, {"a": ((4,), np.float32), "b": ((4,), np.float32)}, produce)
    assert file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def _damaged(tmp_path, name, payload: bytes):
    file = tmp_path / name
    file.write_bytes(payload)
    return file


def test_damaged_files_are_named_with_their_problem(tmp_path):
    good = safetensors_file.write_arrays(tmp_path / "g.safetensors", {"a": np.ones((4, 4), np.float32)}).read_bytes()
    cases = {
        "short.safetensors": (b"\x01\x02", "unreadable or truncated safetensors file .*shorter than its header length"),
        "huge.safetensors": (struct.pack("<Q", 10**9) + b"{}", "header length"),
        "text.safetensors": (struct.pack("<Q", 4) + b"nope", "not JSON"),
        "truncated.safetensors": (good[:-10], "truncated"),
    }
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    cases["overlap.safetensors"] = (struct.pack("<Q", len(header)) + header + bytes(12), "overlap")
    header = json.dumps({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}).encode()
    cases["dtype.safetensors"] = (struct.pack("<Q", len(header)) + header + bytes(8), "unknown dtype 'Q9'")
    for name, (payload, problem) in cases.items():
        file = _damaged(tmp_path, name, payload)
        with pytest.raises(ValueError, match=problem) as err:
            safetensors_file.SafetensorsReader(file)
        assert str(file) in str(err.value)


def test_a_config_that_fails_to_serialise_leaves_the_earlier_config_whole(tmp_path):
    from gal_jax.nn import weights

    file = tmp_path / "config.json"
    weights.write_config(file, {"sample_size": 64})
    with pytest.raises(TypeError):
        weights.write_config(file, {"sample_size": object()})
    assert json.loads(file.read_text()) == {"sample_size": 64}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"], "a temporary file was left"
