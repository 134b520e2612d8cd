"""Conformance of quantize.bf16: INT8 codes really stored (the safetensors file shrinks by what they
weigh), bfloat16 weights rebuilt from the codes on load, float32 in and out, outputs stay close,
and the step only runs where its output can be measured (PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.examples.bert import bert_encoder
from shrinkml.measure.params import torch_param_counts
from shrinkml.models.safetensors_io import load_state_dict, save_state_dict
from shrinkml.techniques.base import ModelState, get_technique
from shrinkml.techniques.quantize_bf16 import (
    Int8Embedding,
    Int8Linear,
    QuantizeBf16Config,
    apply,
    dequantized_copy,
)
from tests.conftest import make_ctx, tiny_mlp


def setup(tmp_path):
    model = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128)
    ids = np.random.default_rng(0).integers(0, 300, (60, 16)).astype(np.int64)
    return model, make_ctx(model, tmp_path, task="fidelity", data=ArrayData(ids))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def test_config_and_registration():
    technique = get_technique("quantize.bf16")
    assert technique.runtime == "torch" and technique.produces == "torch"
    with pytest.raises(ValidationError):
        QuantizeBf16Config(weights="int4")


def test_int8_codes_are_stored_and_the_model_stays_close(tmp_path):
    model, ctx = setup(tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx)
    q = out.state.torch_model
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    embeddings = [m for m in q.modules() if isinstance(m, Int8Embedding)]
    assert len(linears) == 2 * 6 and len(embeddings) == 2 and out.summary["int8_layers"] == 14
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    sd = q.state_dict()
    assert all(sd[k].dtype == torch.int8 for k in sd if k.endswith("weight_int8"))
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] + ".weight_int8" in sd for k in sd)
    x = torch.as_tensor(ctx.splits.test.x[:8])
    with torch.inference_mode():
        ref, got = model(x), q(x)
    assert got.dtype == torch.float32 and cosine(ref, got) > 0.995
    # parameter counts include the INT8 codes (they are weights, held as buffers)
    assert torch_param_counts(q)[0] == pytest.approx(torch_param_counts(model)[0], rel=0.01)

    # the file holds ~1 byte per quantized weight instead of 4
    f32, i8 = tmp_path / "f32.safetensors", tmp_path / "int8.safetensors"
    save_state_dict(model.state_dict(), f32)
    save_state_dict(sd, i8)
    assert i8.stat().st_size < 0.3 * f32.stat().st_size


def test_weights_are_rebuilt_from_the_codes_on_load(tmp_path):
    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    path = tmp_path / "q.safetensors"
    save_state_dict(q.state_dict(), path)
    fresh = apply(ModelState("torch", torch_model=bert_encoder(hidden=64, layers=2, heads=4, vocab=300,
                                                                 intermediate=128, seed=7)),
                  QuantizeBf16Config(), ctx).state.torch_model
    x = torch.as_tensor(ctx.splits.test.x[:4])
    with torch.inference_mode():
        assert not torch.equal(fresh(x), q(x))
        fresh.load_state_dict(load_state_dict(path))
        assert torch.equal(fresh(x), q(x))


def test_load_int8_rebuilds_the_model_from_the_file(tmp_path):
    from shrinkml.techniques.quantize_bf16 import load_int8

    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(keep_float=("embeddings.position",)),
              ctx).state.torch_model
    path = tmp_path / "q.safetensors"
    save_state_dict(q.state_dict(), path)
    other = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128, seed=3)
    loaded = load_int8(other, str(path))
    x = torch.as_tensor(ctx.splits.test.x[:4])
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    assert isinstance(loaded.embeddings.position, torch.nn.Embedding)


def test_dequantized_copy_is_plain_modules_computing_the_same(tmp_path):
    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    plain = dequantized_copy(q)
    assert not any(isinstance(m, Int8Linear | Int8Embedding) for m in plain.modules())
    x = torch.as_tensor(ctx.splits.test.x[:4])
    with torch.inference_mode():
        assert torch.equal(plain(x), q(x))


def test_bfloat16_weights_and_keep_float(tmp_path):
    model, ctx = setup(tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(weights="bfloat16"), ctx)
    assert out.summary["int8_layers"] == 0
    assert {p.dtype for p in out.state.torch_model.parameters()} == {torch.bfloat16}
    kept = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(keep_float=("embeddings.*",)), ctx)
    assert kept.summary["int8_layers"] == 12 and "embeddings.word" in kept.summary["kept_bfloat16"]


def test_float_inputs_are_cast_and_outputs_are_float32(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    x = torch.as_tensor(ctx.splits.test.x[:16])
    with torch.inference_mode():
        got, ref = q(x), model(x)
    assert got.dtype == torch.float32 and cosine(ref, got) > 0.99


def test_errors_name_the_field(tmp_path):
    model, ctx = setup(tmp_path)
    with pytest.raises(InputError, match="no layer matches 'nope'"):
        apply(ModelState("torch", torch_model=model), QuantizeBf16Config(keep_float=("nope",)), ctx)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    with pytest.raises(InputError, match="needs a float32 model"):
        apply(ModelState("torch", torch_model=q), QuantizeBf16Config(), ctx)


def test_compress_refuses_onnxruntime_with_the_fix(tmp_path):
    import shrinkml
    from tests.conftest import toy_data

    with pytest.raises(InputError, match="only torch can run") as info:
        shrinkml.compress(tiny_mlp(), [{"technique": "quantize.bf16"}], data=toy_data(100))
    assert "--runtime torch" in str(info.value)


def test_it_must_be_the_last_step():
    from shrinkml.recipe import Recipe

    recipe = Recipe.from_steps([{"technique": "quantize.bf16"}, {"technique": "prune.magnitude"}])
    with pytest.raises(InputError, match="comes after quantize.bf16") as info:
        recipe.check_model_kind("torch")
    assert info.value.where == "steps[1]" and "last step" in str(info.value)
