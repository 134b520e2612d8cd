"""GPTQ and the group-wise weight codec: GPTQ beats round-to-nearest where it should, reduces to it
where it should, and the packed layout is the one ONNX Runtime's own quantizer writes."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shrinkml.quant.gptq import HessianAccumulator, gptq_quantize
from shrinkml.quant.weight_codec import (
    check_group_size,
    pack_rows,
    round_half_away,
    rtn_quantize,
    unpack_rows,
)


def layer_and_inputs(n: int = 256, k: int = 512, tokens: int = 2048, seed: int = 0):
    """A Linear weight and calibration inputs whose features are correlated (low-rank mixing) and
    include a few outlier channels, as in transformer activations."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(tokens, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.5 * torch.randn(tokens, k, generator=g)
    x[:, :6] *= 15.0  # outlier features
    return weight, x


def output_error(x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ dequantized.T) ** 2).sum())


@dataclass(frozen=True)
class Case:
    bits: int
    group_size: int
    symmetric: bool = False


@pytest.mark.parametrize("case", [Case(4, 32), Case(4, 128), Case(4, 32, symmetric=True), Case(8, 128)], ids=str)
def test_gptq_has_lower_output_error_than_rtn(case):
    weight, x = layer_and_inputs()
    acc = HessianAccumulator(weight.shape[1])
    for chunk in x.split(500):  # several batches, as with hooks
        acc.add(chunk)
    gptq = gptq_quantize(weight, acc.hessian(), bits=case.bits, group_size=case.group_size, symmetric=case.symmetric)
    rtn = rtn_quantize(weight, bits=case.bits, group_size=case.group_size, symmetric=case.symmetric)
    gptq_err = output_error(x, weight, gptq.dequantize())
    rtn_err = output_error(x, weight, rtn.dequantize())
    assert gptq_err < 0.5 * rtn_err, (gptq_err, rtn_err)
    # GPTQ trades weight error for output error: its weights are not closer to W than RTN's
    assert float(((gptq.dequantize() - weight) ** 2).sum()) >= 0.9 * float(((rtn.dequantize() - weight) ** 2).sum())


def test_gptq_on_held_out_inputs_still_beats_rtn():
    weight, x = layer_and_inputs(tokens=4096)
    calibration, held_out = x[:2048], x[2048:]
    acc = HessianAccumulator(weight.shape[1])
    acc.add(calibration)
    gptq = gptq_quantize(weight, acc.hessian(), bits=4, group_size=32)
    rtn = rtn_quantize(weight, bits=4, group_size=32, symmetric=False)
    assert output_error(held_out, weight, gptq.dequantize()) < output_error(held_out, weight, rtn.dequantize())


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_with_identity_hessian_is_rtn(symmetric):
    weight, _ = layer_and_inputs(n=64, k=256)
    gptq = gptq_quantize(weight, torch.eye(256), bits=4, group_size=32, symmetric=symmetric)
    rtn = rtn_quantize(weight, bits=4, group_size=32, symmetric=symmetric)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scales, rtn.scales)


def test_gptq_handles_dead_inputs_and_block_smaller_than_group():
    weight, x = layer_and_inputs(n=32, k=128, tokens=512)
    x[:, 10] = 0.0  # an input that never fires: its Hessian row is zero
    acc = HessianAccumulator(128)
    acc.add(x)
    q = gptq_quantize(weight, acc.hessian(), bits=4, group_size=64, block_size=16)
    assert q.codes.shape == (32, 128) and q.scales.shape == (32, 2)
    assert torch.all(q.dequantize()[:, 10] == 0)  # the dead column is zeroed, not quantized noise
    assert output_error(x, weight, q.dequantize()) < output_error(x, weight, rtn_quantize(
        weight, bits=4, group_size=64, symmetric=False).dequantize())


def test_gptq_rejects_wrong_shapes_and_settings():
    weight = torch.zeros(8, 32)
    with pytest.raises(ValueError, match="hessian must have shape"):
        gptq_quantize(weight, torch.eye(16), bits=4, group_size=16)
    with pytest.raises(ValueError, match="power of 2"):
        gptq_quantize(weight, torch.eye(32), bits=4, group_size=48)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(weight, torch.eye(32), bits=4, group_size=16, damp=0.0)


# --- codec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,length", [(4, 64), (4, 7), (8, 33)])
def test_pack_unpack_round_trip(bits, length):
    codes = np.random.default_rng(0).integers(0, 2**bits, (5, length)).astype(np.uint8)
    packed = pack_rows(codes, bits)
    assert packed.shape == (5, -(-length * bits // 8))
    np.testing.assert_array_equal(unpack_rows(packed, bits, length), codes)


def test_low_nibble_holds_the_lower_index():
    assert pack_rows(np.array([[1, 2, 3]], np.uint8), 4, fill=8).tolist() == [[0x21, 0x83]]


def test_round_half_away_matches_c_roundf():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 3.2, -3.7])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0, 3.0, -4.0]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_bounded_by_the_step(bits, symmetric):
    weight, _ = layer_and_inputs(n=16, k=96)
    q = rtn_quantize(weight, bits=bits, group_size=32, symmetric=symmetric)
    step = q.scales.abs().repeat_interleave(32, dim=1)
    error = (q.dequantize() - weight).abs()
    if symmetric:
        # ONNX Runtime's symmetric scheme maps the largest-magnitude value onto code 0 (-2**(bits-1)
        # steps); the opposite extreme can only reach 2**(bits-1) - 1 steps and clips by < 1 step
        assert torch.all(error <= step + 1e-7)
    else:
        assert torch.all(error <= step * 0.5 + 1e-7)


def test_group_size_must_be_a_power_of_two():
    assert check_group_size(64) == 64
    for bad in (8, 48, 100):
        with pytest.raises(ValueError, match="power of 2"):
            check_group_size(bad)


@pytest.mark.parametrize("bits,symmetric,block,k", [(4, False, 32, 256), (4, True, 16, 200), (8, False, 128, 200),
                                                    (8, True, 32, 64)])
def test_codes_are_byte_identical_to_onnxruntime_quantizer(bits, symmetric, block, k):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    n = 24
    rng = np.random.default_rng(k)
    w_kn = (rng.normal(size=(k, n)) * rng.gamma(1.0, 1.0, size=(k, 1))).astype(np.float32)
    w_kn[:16, 0] = 0.0  # an all-zero group
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w_kn, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(
        copy.deepcopy(model), algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    )
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    ours = rtn_quantize(torch.from_numpy(w_kn.T.copy()), bits=bits, group_size=block, symmetric=symmetric)
    np.testing.assert_array_equal(theirs[f"W_Q{bits}"], ours.packed_codes())
    np.testing.assert_array_equal(theirs["W_scales"], ours.scales.numpy())
    if symmetric:
        assert "W_zero_points" not in theirs and ours.packed_zero_points() is None
    else:
        np.testing.assert_array_equal(theirs["W_zero_points"], ours.packed_zero_points())
