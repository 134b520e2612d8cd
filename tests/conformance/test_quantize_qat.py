"""Conformance of quantize.qat and its building blocks: fake quantization exports as QDQ, the
weight fold stores INT8 without changing outputs, ONNX Runtime runs fused integer kernels, and the
trained INT8 model keeps the float model's accuracy."""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from torch import nn

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.quant.fake_quant import (
    ActivationQuantizer,
    FakeQuantConv2d,
    FakeQuantLinear,
    fold_batchnorms,
    freeze,
    prepare_qat,
    set_observing,
    set_quantizing,
)
from shrinkml.quant.onnx_fold import fold_weight_quantizers, quantize_linear
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.finetune import FinetuneConfig
from shrinkml.techniques.finetune import apply as finetune
from shrinkml.techniques.quantize_qat import QuantizeQATConfig, apply
from tests.conftest import make_ctx, tiny_cnn, tiny_mlp, toy_data

FAST = QuantizeQATConfig(epochs=2, lr=1e-3, batch_size=32)


@lru_cache(maxsize=None)
def _trained(kind: str) -> nn.Module:
    """A tiny model trained on the toy task (cached: the tests only read it)."""
    model = tiny_mlp() if kind == "mlp" else tiny_cnn()
    cfg = FinetuneConfig(epochs=15, lr=5e-3, distill=False, patience=None, batch_size=32)
    with tempfile.TemporaryDirectory() as workdir:
        ctx = make_ctx(model, Path(workdir), data=toy_data(400))
        return finetune(ModelState("torch", torch_model=model), cfg, ctx).state.torch_model


def _calibrated(model: nn.Module, x: np.ndarray, **kw) -> nn.Module:
    qmodel, _, _ = prepare_qat(model, **kw)
    qmodel.eval()
    set_observing(qmodel, True)
    with torch.no_grad():
        qmodel(torch.from_numpy(x))
    set_quantizing(qmodel, True)
    freeze(qmodel)
    return qmodel


def _run(model: onnx.ModelProto, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    return float((scores.argmax(1) == y).mean())


# ---- config ---------------------------------------------------------------------------------


def test_config_round_trip():
    cfg = QuantizeQATConfig(epochs=5, lr=1e-3, per_channel=False, keep_float=("classifier",))
    assert QuantizeQATConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert QuantizeQATConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        cfg.epochs = 3  # frozen


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"lr": 0}, {"batch_size": 0}, {"alpha": 1.5}, {"temperature": 0},
     {"observer_momentum": 1.0}, {"observer_momentum": 0}, {"freeze_observers_after": 1.5},
     {"freeze_observers_after": -0.1}, {"bits": 4}],
)
def test_invalid_values_rejected(bad):
    with pytest.raises(ValidationError):
        QuantizeQATConfig(**bad)


# ---- fake quantization ----------------------------------------------------------------------


def test_activation_observer_ema_includes_zero_and_sets_uint8_params():
    q = ActivationQuantizer(momentum=0.5)
    q.observing = True
    q(torch.tensor([1.0, 3.0]))
    q(torch.tensor([2.0, 5.0]))
    assert float(q.min_val) == pytest.approx(1.5) and float(q.max_val) == pytest.approx(4.0)
    assert float(q.scale) == pytest.approx(4.0 / 255)  # range widened to include 0
    assert int(q.zero_point) == 0
    q.quantizing = True
    q.observing = False
    y = q(torch.tensor([0.0, 1.0, 100.0]))
    assert float(y[0]) == 0.0 and abs(float(y[1]) - 1.0) <= float(q.scale) / 2
    assert float(y[2]) == pytest.approx(4.0)  # clipped to the frozen range


def test_constant_zero_activation_gets_a_safe_scale():
    q = ActivationQuantizer()
    q.observing = q.quantizing = True
    assert torch.equal(q(torch.zeros(4)), torch.zeros(4))
    assert float(q.scale) == 1.0


def test_weight_fake_quant_is_per_channel_int8_with_ste_gradient():
    torch.manual_seed(0)
    layer = FakeQuantLinear.from_float(nn.Linear(8, 4), per_channel=True, symmetric_activations=False, momentum=0.9)
    wq = layer.quantized_weight()
    scale = layer.weight.detach().abs().amax(1, keepdim=True) / 127
    levels = wq.detach() / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 127 + 1e-4
    assert torch.allclose(wq, layer.weight, atol=float(scale.max()) / 2 + 1e-7)
    wq.sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones_like(layer.weight))  # straight through


def test_prepare_keeps_names_folds_batchnorm_and_does_not_mutate():
    model = tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    qmodel, names, folded = prepare_qat(model, keep_float=("7",))
    assert names == ["0", "3"] and folded == ["1"]
    assert isinstance(qmodel[0], FakeQuantConv2d) and isinstance(qmodel[1], nn.Identity)
    assert type(qmodel[7]) is nn.Linear
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.from_numpy(toy_data(16).x)
    with torch.no_grad():  # activation rounding is off; INT8 weights move outputs by little
        assert torch.allclose(qmodel.eval()(x), model(x), atol=2e-3)
        float_copy = copy.deepcopy(model)
        assert fold_batchnorms(float_copy, ["0", "3"]) == ["1"]  # folding alone changes nothing
        assert torch.allclose(float_copy(x), model(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fake_quant_exports_as_qdq_pairs(kind):
    x = toy_data(32).x
    qmodel = _calibrated(tiny_mlp() if kind == "mlp" else tiny_cnn(), x)
    model = export_onnx(qmodel, x[:2], opset=17)
    ops = [n.op_type for n in model.graph.node]
    layers = 2 if kind == "mlp" else 3
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 3 * layers  # input, weight, output
    weight_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0].endswith(".weight")]
    assert len(weight_q) == layers
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in weight_q:
        assert helper.get_attribute_value(node.attribute[0]) == 0  # axis: per output channel
        assert inits[node.input[1]].ndim == 1 and inits[node.input[2]].dtype == np.int8
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
    # unfused (no optimizations): ONNX QDQ arithmetic is exactly the fake quantization
    got = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.max(np.abs(got - ref)) < 1e-5


# ---- folding --------------------------------------------------------------------------------


def test_quantize_linear_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0], dtype=np.float32)
    assert quantize_linear(x, np.float32(1.0), np.int8(0)).tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert quantize_linear(x, np.float32(1.0), np.uint8(10)).tolist() == [10, 12, 12, 10, 8, 255, 0]
    assert quantize_linear(x, np.float32(2.0), None).dtype == np.uint8


@pytest.mark.parametrize(("axis", "zp_type"), [(0, np.int8), (1, np.int8), (0, np.uint8), (None, np.int8)])
def test_quantize_linear_matches_onnx_runtime(axis, zp_type):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (6, 5, 3)).astype(np.float32)
    w[0, 0, 0] = 0.5 * 0.25  # exact ties
    w[1, 1, 1] = -1.5 * 0.25
    if axis is None:
        scale, zp = np.array(0.25, np.float32), np.array(3, zp_type)
    else:
        n = w.shape[axis]
        scale = rng.uniform(0.01, 0.05, n).astype(np.float32)
        scale[:2] = 0.25
        zp = np.arange(n).astype(zp_type)
    node = helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=axis if axis is not None else 1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
        [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(np.dtype(zp_type)), w.shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"w": w})[0]
    got = quantize_linear(w, scale, zp, axis=axis if axis is not None else 1)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fold_stores_int8_with_identical_outputs(kind):
    x = toy_data(32).x
    exported = export_onnx(_calibrated(tiny_mlp() if kind == "mlp" else tiny_cnn(), x), x[:2])
    original_bytes = exported.SerializeToString()
    folded, summary = fold_weight_quantizers(exported)
    assert exported.SerializeToString() == original_bytes  # input not modified
    onnx.checker.check_model(folded, full_check=True)
    assert summary["folded_weights"] == (2 if kind == "mlp" else 3) and not summary["skipped"]
    assert summary["integer_bytes"] * 4 == summary["float_bytes_removed"]
    weights = [t for t in folded.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == TensorProto.INT8 for t in weights)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].endswith(".weight") for n in folded.graph.node)
    assert len(folded.SerializeToString()) < len(original_bytes)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_array_equal(_run(folded, x, level), _run(exported, x, level))


def test_fold_resolves_constant_node_scales_and_identity_zero_points():
    w = np.array([[0.1, -0.2], [0.35, 0.05]], dtype=np.float32)
    nodes = [
        helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([0.01, 0.02], np.float32))),
        helper.make_node("Constant", [], ["z0"], value=numpy_helper.from_array(np.zeros(2, np.int8))),
        helper.make_node("Identity", ["z0"], ["z"]),
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, summary = fold_weight_quantizers(model)
    assert summary["folded_weights"] == 1
    onnx.checker.check_model(folded, full_check=True)
    (stored,) = folded.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(stored), [[10, -20], [18, 2]])  # 17.5 -> 18, 2.5 -> 2
    x = np.array([[1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(model, x))


def test_fold_leaves_runtime_scales_alone():
    nodes = [
        helper.make_node("ReduceMax", ["w"], ["m"], keepdims=0),
        helper.make_node("QuantizeLinear", ["w", "m"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "m"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")])
    folded, summary = fold_weight_quantizers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert summary["folded_weights"] == 0
    assert summary["skipped"] == [{"node": "wq", "reason": "scale or zero point is computed at run time"}]


# ---- the technique --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_qat_keeps_accuracy_with_int8_weights(tmp_path, kind):
    model = _trained(kind)
    before = copy.deepcopy(model.state_dict())
    ctx = make_ctx(model, tmp_path, data=toy_data(400))
    out = apply(ModelState("torch", torch_model=model), QuantizeQATConfig(epochs=3, lr=1e-3, batch_size=32), ctx)
    assert out.state.kind == "onnx"
    proto = out.state.onnx_model
    onnx.checker.check_model(proto, full_check=True)
    x, y = ctx.splits.test.x, ctx.splits.test.y
    with torch.no_grad():
        float_scores = model(torch.from_numpy(x)).numpy()
    got = OrtRunner(proto.SerializeToString(), threads=1).run(x)
    assert _accuracy(got, y) >= _accuracy(float_scores, y) - 0.03, (_accuracy(got, y), _accuracy(float_scores, y))
    assert _accuracy(got, float_scores.argmax(1)) >= 0.9  # agreement with the float model
    # weights are INT8 on disk: a quarter of the float bytes, no float matrix left
    float_proto = export_onnx(model, ctx.example_input)
    float_weight_bytes = sum(len(t.raw_data) for t in float_proto.graph.initializer if len(t.dims) >= 2)
    weights = [t for t in proto.graph.initializer if len(t.dims) >= 2]
    assert all(t.data_type == TensorProto.INT8 for t in weights)
    assert sum(len(t.raw_data) for t in weights) * 4 == float_weight_bytes
    assert len(proto.SerializeToString()) < len(float_proto.SerializeToString())
    s = out.summary
    assert s["epochs_run"] == 3 and len(s["history"]) == 3 and all(np.isfinite(h["train_loss"]) for h in s["history"])
    assert s["train_examples"] == len(ctx.splits.finetune) and s["used_labels"] and s["distill"]
    assert s["folded_weights"] == len(s["quantized_layers"]) == (2 if kind == "mlp" else 3)
    assert s["kept_float"] == []
    assert s["export_max_abs_diff"] <= s["export_tolerance"]
    assert s["ort_integer_ops"] and not s["ort_float_compute_ops"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_qat_file_is_about_a_quarter_of_float32(tmp_path):
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()
    ctx = make_ctx(wide, tmp_path)
    out = apply(ModelState("torch", torch_model=wide), QuantizeQATConfig(epochs=1), ctx)
    float_size = len(export_onnx(wide, ctx.example_input).SerializeToString())
    ratio = len(out.state.onnx_model.SerializeToString()) / float_size
    assert 0.24 < ratio < 0.30, ratio


@pytest.mark.parametrize(("kind", "fused"), [("mlp", {"QGemm": 2}), ("cnn", {"QLinearConv": 2, "QGemm": 1})])
def test_onnx_runtime_runs_fused_int8_kernels(tmp_path, kind, fused):
    model = tiny_mlp() if kind == "mlp" else tiny_cnn()
    out = apply(ModelState("torch", torch_model=model), FAST, make_ctx(model, tmp_path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(out.state.onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert {op: ops.count(op) for op in fused} == fused
    assert not {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"} & set(ops), ops  # no float compute left
    assert out.summary["ort_integer_ops"] == fused


@pytest.mark.parametrize(
    ("per_channel", "symmetric_activations", "freeze_after"),
    [(False, False, 0.5), (True, True, 0.0), (False, True, 1.0)],
)
def test_quantization_variants_export_and_fuse(tmp_path, tiny_model, per_channel, symmetric_activations, freeze_after):
    cfg = QuantizeQATConfig(epochs=1, per_channel=per_channel, symmetric_activations=symmetric_activations,
                            freeze_observers_after=freeze_after)
    ctx = make_ctx(tiny_model, tmp_path)
    out = apply(ModelState("torch", torch_model=tiny_model), cfg, ctx)
    proto = out.state.onnx_model
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scales = [inits[n.input[1]] for n in proto.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")]
    assert len(scales) == out.summary["folded_weights"] and all((v.size > 1) is per_channel for v in scales)
    act_zero_points = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == TensorProto.UINT8]
    assert bool(act_zero_points) is not symmetric_activations  # int8 activations have no uint8 zero points
    steps = math.ceil(len(ctx.splits.finetune) / cfg.batch_size)
    assert out.summary["observers_frozen_after_step"] == round(freeze_after * steps)
    assert out.summary["ort_integer_ops"] and not out.summary["ort_float_compute_ops"]
    assert out.summary["export_max_abs_diff"] <= out.summary["export_tolerance"]


def test_keep_float_respected(tmp_path):
    model = tiny_mlp()
    cfg = FAST.model_copy(update={"keep_float": ("3",)})
    out = apply(ModelState("torch", torch_model=model), cfg, make_ctx(model, tmp_path))
    assert out.summary["quantized_layers"] == ["1"] and out.summary["kept_float"] == ["3"]
    inits = {t.name: t for t in out.state.onnx_model.graph.initializer}
    assert inits["3.weight"].data_type == TensorProto.FLOAT
    assert inits["1.weight_quantized"].data_type == TensorProto.INT8 and "1.weight" not in inits
    assert out.summary["ort_integer_ops"] == {"QGemm": 1} and out.summary["ort_float_compute_ops"] == {"Gemm": 1}


def test_keep_float_matching_nothing_is_an_input_error(tmp_path):
    model = tiny_mlp()
    with pytest.raises(InputError, match="no layer matches 'head'"):
        cfg = FAST.model_copy(update={"keep_float": ("head",)})
        apply(ModelState("torch", torch_model=model), cfg, make_ctx(model, tmp_path))
    with pytest.raises(InputError, match="found no layer to quantize"):
        cfg = FAST.model_copy(update={"keep_float": ("*",)})
        apply(ModelState("torch", torch_model=model), cfg, make_ctx(model, tmp_path))


def test_never_reads_the_test_split(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    poisoned = ArrayData(np.full_like(ctx.splits.test.x, np.nan), ctx.splits.test.y)
    splits = Splits(ctx.splits.calibration, ctx.splits.finetune, poisoned, ctx.splits.source, ctx.splits.seed)
    ctx = dataclasses.replace(ctx, splits=splits)
    out = apply(ModelState("torch", torch_model=model), FAST, ctx)  # NaNs would break observers or the loss
    assert all(np.isfinite(h["train_loss"]) for h in out.summary["history"])


def test_non_finite_training_data_is_an_input_error(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    bad = ctx.splits.finetune.x.copy()
    bad[3] = np.inf
    splits = dataclasses.replace(ctx.splits, finetune=ArrayData(bad, ctx.splits.finetune.y))
    with pytest.raises(InputError, match="non-finite"):
        apply(ModelState("torch", torch_model=model), FAST, dataclasses.replace(ctx, splits=splits))


def test_keeps_pruned_zeros(tmp_path):
    model = tiny_mlp()
    with torch.no_grad():
        model[1].weight[:, ::2] = 0
    state = ModelState("torch", torch_model=model, sparse_params=frozenset({"1.weight"}))
    out = apply(state, FAST, make_ctx(model, tmp_path))
    inits = {t.name: numpy_helper.to_array(t) for t in out.state.onnx_model.graph.initializer}
    assert np.count_nonzero(inits["1.weight_quantized"][:, ::2]) == 0
    assert np.count_nonzero(inits["1.weight_quantized"][:, 1::2]) > 0
    assert out.state.sparse_params == state.sparse_params


def test_no_labels_and_no_distill_is_an_input_error(tmp_path):
    model = tiny_mlp()
    with pytest.raises(InputError, match="distill: true"):
        apply(ModelState("torch", torch_model=model), FAST.model_copy(update={"distill": False}),
              make_ctx(model, tmp_path, task="fidelity"))


def test_distills_without_labels(tmp_path):
    model = _trained("mlp")
    ctx = make_ctx(model, tmp_path, task="fidelity", data=toy_data(400))
    out = apply(ModelState("torch", torch_model=model), FAST, ctx)
    assert out.summary["used_labels"] is False
    x = ctx.splits.test.x
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert _accuracy(OrtRunner(out.state.onnx_model.SerializeToString(), threads=1).run(x), ref.argmax(1)) >= 0.9


def test_a_garbled_export_fails_the_export_check(tmp_path, monkeypatch):
    """The export bound (5% of the output range, or the quantization error itself when larger)
    still catches an export that computes something else: here every folded weight negated."""
    import shrinkml.quant.onnx_fold as fold_module

    real_fold = fold_module.fold_weight_quantizers

    def garbling_fold(model):
        folded, summary = real_fold(model)
        for t in folded.graph.initializer:
            if t.data_type == TensorProto.INT8 and len(t.dims) == 2:
                negated = (-numpy_helper.to_array(t).astype(np.int16)).clip(-128, 127).astype(np.int8)
                t.CopyFrom(numpy_helper.from_array(negated, t.name))
        return folded, summary

    monkeypatch.setattr(fold_module, "fold_weight_quantizers", garbling_fold)
    model = _trained("mlp")
    ctx = make_ctx(model, tmp_path, data=toy_data(200))
    with pytest.raises(InputError, match="does not match PyTorch"):
        apply(ModelState("torch", torch_model=model), QuantizeQATConfig(epochs=1, lr=1e-3, batch_size=32), ctx)
