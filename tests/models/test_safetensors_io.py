"""safetensors I/O: exact round trips, smaller files for sparse tensors, no unpickling, and
rebuilding a channel-pruned model from the user's factory."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrinkml.techniques.prune_channels as pc
from shrinkml.data.arrays import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.models.safetensors_io import (
    SPARSE_METADATA_KEY,
    check_safetensors_file,
    fit_module_to_state_dict,
    load_state_dict,
    save_state_dict,
)
from shrinkml.progress import SILENT
from shrinkml.techniques.base import ModelState, StepContext


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("shrinkml must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def sparse(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def test_round_trip_is_exact_for_all_dtypes(tmp_path):
    weight = sparse((300, 200), 0.1)
    state = {
        "weight": weight,
        "bias": torch.randn(200),
        "half": sparse((64, 64), 0.2).half(),
        "bf16": sparse((64, 64), 0.2).bfloat16(),
        "empty": torch.zeros(0, 3),
        "counts": torch.tensor(7),
        "ints": torch.tensor([0, 0, 0, 5] * 100),
        "flags": torch.rand(1000) < 0.05,
        "nan": torch.tensor([float("nan")] + [0.0] * 999),
    }
    summary = save_state_dict(state, tmp_path / "m.safetensors", metadata={"source": "test"})
    back = load_state_dict(tmp_path / "m.safetensors")
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor) or name == "nan", name
    assert torch.isnan(back["nan"][0]) and not back["nan"][1:].any()
    assert summary["tensors_encoded"] == 6  # weight, half, bf16, ints, flags, nan
    assert summary["bytes"] == (tmp_path / "m.safetensors").stat().st_size
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert "weight::values" in f.keys() and "weight::mask" in f.keys() and "bias" in f.keys()
    assert meta["source"] == "test"
    assert json.loads(meta[SPARSE_METADATA_KEY])["weight"] == {"shape": [300, 200], "dtype": "float32"}


def test_sparse_tensor_makes_the_file_smaller_and_dense_does_not_change(tmp_path):
    pruned = {"w": sparse((512, 512), 0.1)}
    dense = {"w": torch.randn(512, 512)}
    assert save_state_dict(pruned, tmp_path / "p.safetensors")["bytes"] < 0.15 * 512 * 512 * 4
    summary = save_state_dict(dense, tmp_path / "d.safetensors")
    assert summary["tensors_encoded"] == 0
    assert summary["bytes"] < 512 * 512 * 4 + 1024  # dense + header only


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"])
def test_sparse_round_trip_of_dtypes_without_masked_assignment(tmp_path, dtype):
    # torch has no CPU masked assignment for these; decoding scatters same-width integer bits instead
    dtype = getattr(torch, dtype)
    if dtype.itemsize == 1:
        bits = (torch.rand(4096, generator=torch.Generator().manual_seed(0)) < 0.05).to(torch.uint8) * 0x38
        w = bits.view(dtype)
    else:
        w = (torch.rand(4096, generator=torch.Generator().manual_seed(0)) < 0.05).to(torch.int64).mul(3).to(dtype)
    assert save_state_dict({"w": w}, tmp_path / "m.safetensors")["tensors_encoded"] == 1
    back = load_state_dict(tmp_path / "m.safetensors")["w"]
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))


def test_negative_zeros_count_as_zeros(tmp_path):
    w = sparse((256, 256), 0.1)  # randn * mask: about half the zeros are -0.0
    assert torch.signbit(w[w == 0]).any()
    assert save_state_dict({"w": w}, tmp_path / "m.safetensors")["bytes"] < 0.15 * w.numel() * 4
    assert torch.equal(load_state_dict(tmp_path / "m.safetensors")["w"], w)


def test_shared_and_strided_tensors_are_saved(tmp_path):
    w = torch.randn(8, 8)
    state = {"a": w, "tied": w, "view": w[:2], "t": w.t()}
    save_state_dict(state, tmp_path / "m.safetensors")
    back = load_state_dict(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_write_is_atomic(tmp_path):
    target = tmp_path / "m.safetensors"
    save_state_dict({"a": torch.ones(3)}, target)
    with pytest.raises(InputError, match="not a tensor"):
        save_state_dict({"a": torch.ones(3), "b": "not a tensor"}, target)
    with pytest.raises(Exception):  # a failure inside the writer leaves the old file in place
        save_state_dict({"a": torch.ones(3)}, target, metadata={"n": 1})
    assert torch.equal(load_state_dict(target)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("bad", [{"x::values": torch.ones(2)}])
def test_reserved_names_rejected(tmp_path, bad):
    with pytest.raises(InputError, match="'::'"):
        save_state_dict(bad, tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="reserved"):
        save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors", metadata={SPARSE_METADATA_KEY: "{}"})


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"PK\x03\x04" + b"\x00" * 100, id="torch.save-zip"),
        pytest.param(pickle.dumps({"w": [1.0, 2.0]}, protocol=2), id="pickle-2"),
        pytest.param(pickle.dumps({"w": [1.0, 2.0]}, protocol=4), id="pickle-4"),
    ],
)
def test_pickle_and_torch_save_files_refused(tmp_path, payload):
    path = tmp_path / "model.pt"
    path.write_bytes(payload)
    with pytest.raises(InputError, match="does not unpickle untrusted files") as info:
        load_state_dict(path)
    assert "safetensors.torch.save_file(torch.load(" in info.value.fix
    assert "weights_only=True" in info.value.fix


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05\x00", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", b"\xff" * 8 + b"{}"],
)
def test_corrupt_header_refused(tmp_path, payload):
    path = tmp_path / "m.safetensors"
    path.write_bytes(payload)
    with pytest.raises(InputError, match="header"):
        check_safetensors_file(path)


def test_truncated_file_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict({"w": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match="cannot be read"):
        load_state_dict(path)


def test_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path):
    # a header of 0x0280 bytes starts with b"\x80\x02", the same as pickle protocol 2
    path = tmp_path / "m.safetensors"
    for n in range(1, 700, 4):
        save_state_dict({"w": torch.ones(2)}, path, metadata={"pad": "x" * n})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("could not produce the colliding header length")
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


# --- fitting a freshly built model to the shapes of a pruned state dict -------------------------


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 24),
        nn.LayerNorm(24),
        nn.Linear(24, 4),
    )


def test_pruned_model_rebuilt_from_factory(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    data = ArrayData(x, np.zeros(4, dtype=np.int64))
    ctx = StepContext(Splits(data, data, data, "t", 0), None, None, x, 0, 1, SILENT, tmp_path)
    pruned = pc.apply(ModelState("torch", cnn().eval()), pc.PruneChannelsConfig(), ctx).state.torch_model
    assert pruned[3].groups == 8 and pruned[11].normalized_shape == (12,)
    save_state_dict(pruned.state_dict(), tmp_path / "pruned.safetensors")

    fresh = cnn()
    state = load_state_dict(tmp_path / "pruned.safetensors")
    assert fit_module_to_state_dict(fresh, state) is fresh
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    assert (fresh[3].in_channels, fresh[3].out_channels, fresh[3].groups) == (8, 8, 8)
    assert fresh[4].num_features == 8 and fresh[4].running_mean.shape == (8,)
    with torch.no_grad():
        assert torch.equal(fresh(torch.as_tensor(x)), pruned(torch.as_tensor(x)))


def test_fit_embedding_and_linear():
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 16))
    state = {"0.weight": torch.randn(100, 20), "1.weight": torch.randn(16, 20), "1.bias": torch.randn(16)}
    fit_module_to_state_dict(model, state).load_state_dict(state, strict=True)
    assert model[0].embedding_dim == 20 and model[1].in_features == 20
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, 16)


def test_fit_unsupported_layer_names_it():
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(8))
    state = {"0.weight": torch.randn(6, 4), "0.bias": torch.randn(6), "1.weight": torch.randn(6)}
    with pytest.raises(InputError, match="PReLU") as info:
        fit_module_to_state_dict(model, state)
    assert "'1'" in info.value.where and "[8]" in info.value.expected and "[6]" in info.value.found
