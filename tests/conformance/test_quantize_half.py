"""Conformance of quantize.half: the 16-bit file is about half the size, ONNX Runtime runs it, the
outputs stay close to float32, and the summary says what the CPU really computes in."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shrinkml.errors import InputError
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.techniques import quantize_half
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.quantize_half import QuantizeHalfConfig, apply, cpu_native_fp16
from tests.conftest import make_ctx, tiny_mlp

HALF_TYPES = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers with 2+ dimensions (matrices and kernels), by name."""
    return {t.name: t for t in model.graph.initializer if len(t.dims) >= 2}


def test_config_round_trip_and_validation():
    cfg = QuantizeHalfConfig(dtype="bfloat16", keep_float=("3", "*/Softmax"))
    assert QuantizeHalfConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert QuantizeHalfConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        cfg.dtype = "float16"  # frozen


@pytest.mark.parametrize(
    "bad",
    [{"dtype": "int8"}, {"dtype": "float32"}, {"keep_io": False}, {"dtype": "bfloat16", "keep_io_float32": False}],
)
def test_invalid_values_rejected(bad):
    with pytest.raises(ValidationError):
        QuantizeHalfConfig(**bad)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_runs_in_ort_close_to_float_and_does_not_mutate(tiny_model, tmp_path, dtype):
    ctx = make_ctx(tiny_model, tmp_path)
    before = copy.deepcopy(tiny_model.state_dict())
    out = apply(ModelState("torch", torch_model=tiny_model), QuantizeHalfConfig(dtype=dtype), ctx)
    assert out.state.kind == "onnx"
    model = out.state.onnx_model
    onnx.checker.check_model(model, full_check=True)
    # inputs and outputs stay float32: callers feed the same arrays
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # every weight matrix / kernel is stored in 16 bits: exactly half the bytes of float32
    float_model = export_onnx(tiny_model, ctx.example_input)
    half_weights, float_weights = _weights(model), _weights(float_model)
    assert half_weights and all(t.data_type == HALF_TYPES[dtype] for t in half_weights.values())
    half_bytes = sum(np.prod(t.dims) * 2 for t in half_weights.values())
    float_bytes = sum(len(t.raw_data) for t in float_weights.values())
    assert half_bytes * 2 == float_bytes
    assert len(model.SerializeToString()) < len(float_model.SerializeToString())
    x = ctx.splits.test.x
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x)).numpy()
    got = OrtRunner(model.SerializeToString(), threads=1).run(x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert _cosine_min(got, ref) > 0.999
    assert np.max(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref)) + 1e-3
    assert out.summary["max_abs_diff_vs_float32"] < 0.02 * np.max(np.abs(ref)) + 1e-3
    assert out.summary["export_max_abs_diff"] < 1e-4
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_file_is_about_half_the_float32_file(tmp_path, dtype):
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()
    ctx = make_ctx(wide, tmp_path)
    out = apply(ModelState("torch", torch_model=wide), QuantizeHalfConfig(dtype=dtype), ctx)
    float_size = len(export_onnx(wide, ctx.example_input).SerializeToString())
    ratio = len(out.state.onnx_model.SerializeToString()) / float_size
    assert 0.45 < ratio < 0.55, ratio


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_summary_states_compute_dtype_and_cpu_note(tmp_path, dtype):
    model = tiny_mlp()
    out = apply(ModelState("torch", torch_model=model), QuantizeHalfConfig(dtype=dtype), make_ctx(model, tmp_path))
    s = out.summary
    assert s["dtype"] == dtype
    assert s["cpu_native_fp16"] == cpu_native_fp16()
    assert set(s["compute_dtype_by_op"]) == {"Gemm"}
    if dtype == "bfloat16":
        # no bfloat16 Gemm kernel on ORT's CPU provider: stored as bfloat16, computed in float32
        assert s["compute_dtype"] == "float32 (weights stored as bfloat16, cast at load)"
        assert s["compute_dtype_by_op"] == {"Gemm": "float32"}
        assert "only the file is smaller" in s["note"]
    elif s["compute_dtype_by_op"]["Gemm"] == "float32":
        # what ONNX Runtime 1.32 does on x86: no float16 Gemm kernel, so it casts to float32
        assert s["compute_dtype"].startswith("float32 (weights stored as float16")
        assert "half the size" in s["note"]
    else:
        assert s["compute_dtype"] == "float16"
    if s["cpu_native_fp16"] is False:
        assert quantize_half.NO_NATIVE_FP16_NOTE in s["note"]


def test_note_on_a_cpu_without_native_fp16(tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_half, "cpu_native_fp16", lambda: False)
    model = tiny_mlp()
    out = apply(ModelState("torch", torch_model=model), QuantizeHalfConfig(), make_ctx(model, tmp_path))
    assert out.summary["cpu_native_fp16"] is False
    assert "no native FP16 arithmetic" in out.summary["note"]
    assert "latency" in out.summary["note"]


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("flags\t\t: fpu sse2 avx2 f16c fma\n", False),  # f16c only converts
        ("flags\t\t: fpu avx512f avx512_fp16 f16c\n", True),
        ("flags\t\t: fpu amx_tile amx_fp16\n", True),
        ("Features\t: fp asimd asimdhp cpuid\n", True),  # Arm FP16 SIMD
        ("Features\t: fp asimd cpuid\n", False),
        ("processor\t: 0\n", None),
    ],
)
def test_cpu_native_fp16_detection(cpuinfo, expected):
    assert cpu_native_fp16(cpuinfo) is expected


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_keep_float_respected(tmp_path, dtype):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeHalfConfig(dtype=dtype, keep_float=("1",)), ctx)
    assert out.summary["kept_float"] == ["/1/Gemm"]
    weights = _weights(out.state.onnx_model)
    assert weights["1.weight"].data_type == onnx.TensorProto.FLOAT
    half = [t for name, t in weights.items() if name.startswith("3.weight")]
    assert [t.data_type for t in half] == [HALF_TYPES[dtype]]
    onnx.checker.check_model(out.state.onnx_model, full_check=True)
    x = ctx.splits.test.x
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert _cosine_min(OrtRunner(out.state.onnx_model.SerializeToString(), threads=1).run(x), ref) > 0.999


def test_keep_float_any_op_by_node_name(tmp_path):
    model = tiny_mlp()
    cfg = QuantizeHalfConfig(keep_float=("*/Relu",))
    out = apply(ModelState("torch", torch_model=model), cfg, make_ctx(model, tmp_path))
    assert out.summary["kept_float"] == ["/2/Relu"]


def test_keep_float_matching_nothing_is_an_input_error(tmp_path):
    model = tiny_mlp()
    with pytest.raises(InputError, match="no layer matches 'decoder'"):
        cfg = QuantizeHalfConfig(keep_float=("decoder",))
        apply(ModelState("torch", torch_model=model), cfg, make_ctx(model, tmp_path))


def test_float16_io_when_asked(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeHalfConfig(keep_io_float32=False), ctx)
    proto = out.state.onnx_model
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ctx.splits.test.x
    got = session.run(None, {"input": x.astype(np.float16)})[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert _cosine_min(got, ref) > 0.999


def test_accepts_onnx_input_and_rejects_nothing_to_convert(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    proto = export_onnx(model, ctx.example_input)
    out = apply(ModelState("onnx", onnx_model=proto), QuantizeHalfConfig(), ctx)
    assert "export_max_abs_diff" not in out.summary  # nothing was exported here
    assert out.summary["initializers_converted"] == 4
    assert proto.graph.initializer[0].data_type == onnx.TensorProto.FLOAT  # input not modified
    with pytest.raises(InputError, match="no float32 weights"):
        apply(ModelState("onnx", onnx_model=out.state.onnx_model), QuantizeHalfConfig(), ctx)
