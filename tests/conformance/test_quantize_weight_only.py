"""Conformance of quantize.weight_only: INT4/INT8 codes really stored in MatMulNBits nodes, float
weights gone from the file, ONNX Runtime runs it, outputs stay close, and the file shrinks by what
the codes weigh."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from shrinkml.budget import Budget
from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.examples.bert import bert_encoder
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.quantize_weight_only import QuantizeWeightOnlyConfig, apply
from tests.conftest import make_ctx, tiny_mlp


def tiny_bert() -> torch.nn.Module:
    return bert_encoder(hidden=64, layers=2, heads=4, vocab=100, intermediate=128)


def token_data(n: int = 120, seq: int = 16, vocab: int = 100, seed: int = 0) -> ArrayData:
    return ArrayData(np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int64))


def setup(kind: str, tmp_path):
    if kind == "mlp":
        model = tiny_mlp()
        return model, make_ctx(model, tmp_path)
    model = tiny_bert()
    return model, make_ctx(model, tmp_path, task="fidelity", data=token_data())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return OrtRunner(model.SerializeToString(), threads=1).run(x)


def float_weight_initializers(model: onnx.ModelProto) -> list[str]:
    """2-D float initializers other than the scales of quantized nodes."""
    scales = {n.input[2] for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    return [t.name for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 and t.name not in scales]


def test_config_round_trip_and_validation():
    cfg = QuantizeWeightOnlyConfig(bits=8, group_size=64, method="gptq", keep_float=("encoder.layer.0.*",))
    assert QuantizeWeightOnlyConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert QuantizeWeightOnlyConfig.model_validate({"keep_float": "auto"}).keep_float == "auto"
    for bad in ({"bits": 3}, {"group_size": 48}, {"group_size": 8}, {"method": "awq"}, {"gptq_damp": 0.0},
                {"calibration_size": 0}, {"keep_float": "all"}, {"group_sizes": 32}):
        with pytest.raises(ValidationError):
            QuantizeWeightOnlyConfig(**bad)
    with pytest.raises(ValidationError, match="power of 2"):
        QuantizeWeightOnlyConfig(group_size=48)


@dataclass(frozen=True)
class Case:
    model: str
    bits: int
    min_cosine: float
    min_weight_ratio: float  # FP32 bytes / quantized bytes of the Linear weights (group 32)


CASES = [Case("mlp", 8, 0.99, 3.4), Case("mlp", 4, 0.95, 6.0), Case("bert", 8, 0.99, 3.4), Case("bert", 4, 0.95, 6.0)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-int{c.bits}")
def test_stores_codes_in_matmulnbits_and_stays_close(case, tmp_path):
    model, ctx = setup(case.model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(bits=case.bits), ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model must not change"
    assert out.state.kind == "onnx"
    quantized = out.state.onnx_model
    onnx.checker.check_model(quantized)

    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(nbits) == n_linear == out.summary["layers_quantized"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {case.bits}
    assert not any(n.op_type in ("MatMul", "Gemm") and "/attn/MatMul" not in n.name for n in quantized.graph.node)
    # no float copy of a Linear weight is left: only the embedding tables remain 2-D float
    assert all(name.startswith("embeddings.") for name in float_weight_initializers(quantized))

    x = ctx.splits.test.x
    with torch.no_grad():
        reference = model(torch.as_tensor(x)).numpy()
    assert cosine(run(quantized, x), reference) > case.min_cosine
    s = out.summary
    assert s["deploy_max_abs_diff"] < 1e-4 and s["export_max_abs_diff"] < 1e-4
    assert s["weight_bytes_before"] / s["weight_bytes_after"] > case.min_weight_ratio
    # the file shrinks by what the summary says the weights shrink by (names and nodes aside)
    float_file = len(export_onnx(model, x[:2]).SerializeToString())
    saved = float_file - len(quantized.SerializeToString())
    assert saved == pytest.approx(s["weight_bytes_before"] - s["weight_bytes_after"], rel=0.05, abs=600)
    assert s["mean_output_sqnr_db"] > (40 if case.bits == 8 else 15)


def test_rtn_deploys_exactly_what_onnxruntime_quantizer_deploys(tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model, ctx = setup("bert", tmp_path)
    ours = apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(bits=4, group_size=32), ctx)
    float_model = export_onnx(model, ctx.example_input)
    quantizer = MatMulNBitsQuantizer(float_model, algo_config=DefaultWeightOnlyQuantConfig(block_size=32, bits=4))
    quantizer.process()
    theirs = quantizer.model.model
    x = ctx.splits.test.x
    np.testing.assert_array_equal(run(ours.state.onnx_model, x), run(theirs, x))


def test_gptq_beats_rtn_on_calibration_outputs(tmp_path):
    model, ctx = setup("bert", tmp_path)
    state = ModelState("torch", torch_model=model)
    rtn = apply(state, QuantizeWeightOnlyConfig(bits=4, method="rtn"), ctx).summary
    gptq = apply(state, QuantizeWeightOnlyConfig(bits=4, method="gptq"), ctx).summary
    assert gptq["mean_output_sqnr_db"] > rtn["mean_output_sqnr_db"] + 1.0
    assert gptq["weight_bytes_after"] == rtn["weight_bytes_after"]
    assert gptq["calibration_examples"] == len(ctx.splits.calibration)


def test_quantized_embeddings_use_gather_block_quantized(tmp_path):
    model, ctx = setup("bert", tmp_path)
    state = ModelState("torch", torch_model=model)
    plain = apply(state, QuantizeWeightOnlyConfig(bits=4), ctx).state.onnx_model
    out = apply(state, QuantizeWeightOnlyConfig(bits=4, quantize_embeddings=True), ctx)
    quantized = out.state.onnx_model
    gathers = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    assert {n.name for n in gathers} == {"/embeddings/word/Gather_Q4", "/embeddings/position/Gather_Q4"}
    assert float_weight_initializers(quantized) == []
    assert len(quantized.SerializeToString()) < 0.5 * len(plain.SerializeToString())
    x = ctx.splits.test.x
    with torch.no_grad():
        reference = model(torch.as_tensor(x)).numpy()
    assert cosine(run(quantized, x), reference) > 0.95
    assert out.summary["deploy_max_abs_diff"] < 1e-4


def test_keep_float_glob_keeps_those_layers_float(tmp_path):
    model, ctx = setup("bert", tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(keep_float=("encoder.layer.0.ffn.*",)), ctx)
    nodes = {n.name: n for n in out.state.onnx_model.graph.node}
    assert nodes["/encoder/layer.0/ffn/intermediate/MatMul"].op_type == "MatMul"
    assert nodes["/encoder/layer.0/ffn/output/MatMul"].op_type == "MatMul"
    assert "/encoder/layer.1/ffn/output/MatMul_Q4" in nodes
    assert out.summary["kept_float"] == ["encoder.layer.0.ffn.intermediate", "encoder.layer.0.ffn.output"]
    assert out.summary["layers_quantized"] == 10


def test_keep_float_unknown_layer_is_a_clear_error(tmp_path):
    model, ctx = setup("mlp", tmp_path)
    with pytest.raises(InputError, match="no layer matches 'decoder.*'"):
        apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(keep_float=("decoder.*",)), ctx)
    with pytest.raises(InputError, match="leaves no layer to quantize"):
        apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(keep_float=("*",)), ctx)


def test_keep_float_auto_with_a_loose_budget_quantizes_everything(tmp_path):
    model, ctx = setup("mlp", tmp_path)
    ctx = dataclasses.replace(ctx, budget=Budget(max_drop=1.0))
    out = apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(keep_float="auto"), ctx)
    assert out.summary["kept_float"] == [] and out.summary["layers_quantized"] == 2
    assert "keep_float_auto" in out.summary


def test_conv_only_model_has_nothing_to_quantize(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    ctx = make_ctx(model, tmp_path)
    with pytest.raises(InputError, match="found nothing to quantize.*Conv2d"):
        apply(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(), ctx)


def test_k_not_a_multiple_of_the_group_is_padded(tmp_path):
    torch.manual_seed(0)
    # K = 40: one full group of 32 and one padded; K = 24: a single group, smaller than group_size
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24),
                                torch.nn.ReLU(), torch.nn.Linear(24, 10)).eval()
    ctx = make_ctx(model, tmp_path)
    out = apply(ModelState("torch", torch_model=copy.deepcopy(model)), QuantizeWeightOnlyConfig(bits=4), ctx)
    assert out.summary["layers_quantized"] == 3
    x = ctx.splits.test.x
    with torch.no_grad():
        reference = model(torch.as_tensor(x)).numpy()
    assert cosine(run(out.state.onnx_model, x), reference) > 0.95
    assert out.summary["deploy_max_abs_diff"] < 1e-4
