"""Reference INT8 arithmetic: round-trip error bounds, exact zero, SQNR gates on real weights, and
agreement with ONNX Runtime's QuantizeLinear bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from shrinkml.quant.numerics import (
    dequantize,
    per_channel_qparams,
    per_tensor_qparams,
    qparams,
    qrange,
    quantize,
    sqnr_db,
)
from tests.conftest import tiny_cnn, tiny_mlp

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    lo=finite,
    hi=finite,
    symmetric=st.booleans(),
    signed=st.booleans(),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=32),
)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(lo, hi, symmetric, signed, fractions):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = qparams(lo, hi, symmetric=symmetric, signed=signed)
    # the range actually covered: widened to include 0, and symmetric if asked
    a, b = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        a, b = -max(-a, b), max(-a, b)
    x = np.array([a + f * (b - a) for f in fractions], dtype=np.float32)
    x = np.clip(x, a, b)
    back = dequantize(quantize(x, scale, zp, signed=signed), scale, zp)
    slack = 1e-6 * max(abs(a), abs(b), 1e-30)
    assert np.all(np.abs(back - x) <= float(scale) / 2 + slack), (x, back, scale, zp)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(lo=finite, hi=finite, symmetric=st.booleans(), signed=st.booleans())
def test_zero_is_exactly_representable(lo, hi, symmetric, signed):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = qparams(lo, hi, symmetric=symmetric, signed=signed)
    qmin, qmax = qrange(symmetric=symmetric, signed=signed)
    assert qmin <= int(zp) <= qmax
    assert dequantize(quantize(np.zeros(3, np.float32), scale, zp, signed=signed), scale, zp).tolist() == [0, 0, 0]


@dataclass(frozen=True)
class RangeCase:
    symmetric: bool
    signed: bool
    qmin: int
    qmax: int
    zero_point: int


@pytest.mark.parametrize(
    "case",
    [
        RangeCase(symmetric=True, signed=True, qmin=-127, qmax=127, zero_point=0),
        RangeCase(symmetric=True, signed=False, qmin=0, qmax=255, zero_point=128),
        RangeCase(symmetric=False, signed=False, qmin=0, qmax=255, zero_point=64),
        RangeCase(symmetric=False, signed=True, qmin=-128, qmax=127, zero_point=-64),
    ],
)
def test_ranges_and_zero_points_follow_onnx_runtime(case):
    assert qrange(symmetric=case.symmetric, signed=case.signed) == (case.qmin, case.qmax)
    scale, zp = qparams(-1.0, 3.0, symmetric=case.symmetric, signed=case.signed)
    assert int(zp) == case.zero_point
    if not case.symmetric:
        assert float(scale) == pytest.approx(4.0 / 255)


def test_zero_width_range_gets_unit_scale():
    scale, zp = qparams(0.0, 0.0, symmetric=False, signed=False)
    assert float(scale) == 1.0 and int(zp) == 0


def test_quantize_rounds_half_to_even_and_saturates():
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0], np.float32), 1.0, 0, signed=True)
    assert q.tolist() == [0, 2, 2, 0, 127, -128]


def test_sqnr_db_values():
    ref = np.array([1.0, -2.0, 3.0])
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # error energy 1% of the signal's


def _weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    big = torch.nn.Linear(256, 256)
    torch.nn.init.kaiming_normal_(big.weight)
    weights = {"linear256": big.weight.detach().numpy()}
    for name, model in (("mlp", tiny_mlp()), ("cnn", tiny_cnn())):
        for mod_name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                weights[f"{name}.{mod_name}"] = module.weight.detach().numpy()
    return weights


@pytest.mark.parametrize("name", sorted(_weights()))
def test_int8_weight_sqnr_gates(name):
    w = _weights()[name]
    s, z = per_tensor_qparams(w)
    tensor_db = sqnr_db(w, dequantize(quantize(w, s, z, signed=True), s, z))
    s, z = per_channel_qparams(w, axis=0)
    channel_db = sqnr_db(w, dequantize(quantize(w, s, z, signed=True), s, z))
    assert tensor_db >= 30.0, tensor_db
    assert channel_db >= 35.0, channel_db
    assert channel_db >= tensor_db - 1e-9


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_onnx_runtime_quantize_linear(signed):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    scale, zp = qparams(-3.0, 5.0, symmetric=False, signed=signed)
    # random values, exact ties between levels (x / scale = k + 0.5), and out-of-range values
    ties = ((np.arange(-20, 20) + 0.5) * scale).astype(np.float32)
    x = np.concatenate([rng.uniform(-4, 6, 500).astype(np.float32), ties, np.float32([-100, 100, 0])])
    qtype = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"])],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", qtype, [None])],
        initializer=[numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
                     numpy_helper.from_array(np.asarray(zp), "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    got = quantize(x, scale, zp, signed=signed)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
