"""Conformance of quantize.dynamic: INT8 weights really stored, ORT runs it, outputs stay close."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from shrinkml.errors import InputError
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.quantize_dynamic import QuantizeDynamicConfig, apply
from tests.conftest import make_ctx


def test_config_round_trip_and_validation():
    cfg = QuantizeDynamicConfig(op_types=("MatMul", "Gemm", "Conv"), per_channel=False)
    assert QuantizeDynamicConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValidationError):
        QuantizeDynamicConfig(weight_type="int4")
    with pytest.raises(ValidationError):
        QuantizeDynamicConfig(op_types=())


def test_quantizes_to_int8_and_stays_close(tiny_model, tmp_path):
    ctx = make_ctx(tiny_model, tmp_path)
    cfg = QuantizeDynamicConfig(op_types=("MatMul", "Gemm", "Conv"))
    out = apply(ModelState("torch", torch_model=tiny_model), cfg, ctx)
    assert out.state.kind == "onnx"
    model = out.state.onnx_model
    onnx.checker.check_model(model)
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8, "weights must be stored as INT8"
    float_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert not float_weights, [t.name for t in float_weights]
    x = ctx.splits.test.x
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x)).numpy()
    got = OrtRunner(model.SerializeToString(), threads=1).run(x)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) < 0.05 * np.max(np.abs(ref)) + 0.05
    assert out.summary["export_max_abs_diff"] < 1e-4
    # weight bytes shrink about 4x (INT8 is 1 byte, FP32 4); per-channel scales add a little
    from shrinkml.runtimes.export import export_onnx

    float_model = export_onnx(tiny_model, x[:2])
    float_bytes = sum(len(t.raw_data) for t in float_model.graph.initializer if len(t.dims) >= 2)
    int8_bytes = sum(len(t.raw_data) for t in int8)
    assert int8_bytes * 4 == pytest.approx(float_bytes, rel=0.01)
    assert len(model.SerializeToString()) < len(float_model.SerializeToString())


def test_accepts_onnx_input(tmp_path):
    from shrinkml.runtimes.export import export_onnx
    from tests.conftest import tiny_mlp

    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    proto = export_onnx(model, ctx.example_input)
    out = apply(ModelState("onnx", onnx_model=proto), QuantizeDynamicConfig(), ctx)
    assert "MatMulInteger" in out.summary["quantized_ops"] or "DynamicQuantizeLinear" in out.summary["quantized_ops"]


def test_nothing_to_quantize_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    ctx = make_ctx(model, tmp_path)
    with pytest.raises(InputError, match="found nothing to quantize"):
        apply(ModelState("torch", torch_model=model), QuantizeDynamicConfig(op_types=("MatMul",)), ctx)


def test_keep_float_leaves_the_named_layer_float(tmp_path):
    from tests.conftest import tiny_mlp

    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeDynamicConfig(keep_float=("3",)), ctx)
    ops = [n.op_type for n in out.state.onnx_model.graph.node]
    assert ops.count("MatMulInteger") == 1  # layer "1" quantized, layer "3" (the head) float
    assert out.summary["kept_float"] == ["3"]
    with pytest.raises(InputError, match="no layer matches 'head'"):
        apply(ModelState("torch", torch_model=model), QuantizeDynamicConfig(keep_float=("head",)), ctx)


def test_gemm_without_matmul_in_op_types_is_still_quantized(tmp_path):
    from tests.conftest import tiny_mlp

    model = tiny_mlp()
    out = apply(ModelState("torch", torch_model=model), QuantizeDynamicConfig(op_types=("Gemm",)), make_ctx(model, tmp_path))
    assert [n.op_type for n in out.state.onnx_model.graph.node].count("MatMulInteger") == 2
