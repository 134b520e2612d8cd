"""Conformance of quantize.static: INT8 weights and activations really stored (QDQ), ORT runs it,
outputs stay close, calibration is checked and layer selection is honoured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.quant.numerics import dequantize, sqnr_db
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.quantize_static import QuantizeStaticConfig, apply
from tests.conftest import make_ctx, tiny_cnn, tiny_mlp, toy_data

# 60 calibration examples: enough for ranges that cover the test split
DATA = toy_data(600)
FINAL_LAYER = {"mlp": "3", "cnn": "7"}


@pytest.fixture(params=["mlp", "cnn"])
def named_model(request) -> tuple[str, torch.nn.Module]:
    return request.param, (tiny_mlp() if request.param == "mlp" else tiny_cnn())


def _apply(model, tmp_path, data=DATA, **config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = make_ctx(model, tmp_path, data=data)
    return apply(ModelState("torch", torch_model=model), QuantizeStaticConfig(**config), ctx), ctx


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _max_error(model: torch.nn.Module, quantized: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = OrtRunner(quantized.SerializeToString(), threads=1).run(x)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref))), float(np.ptp(ref))


def test_config_round_trip_and_validation():
    cfg = QuantizeStaticConfig(calibration="mse", keep_float=["classifier.*"], op_types=["Conv", "Gemm"])
    assert cfg.keep_float == ("classifier.*",)
    assert QuantizeStaticConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert QuantizeStaticConfig(keep_float="auto").keep_float == "auto"
    for bad in ({"percentile": 50}, {"calibration": "kl"}, {"unknown_key": 1}, {"calibration_size": 0},
                {"smoothquant_alpha": 1.5}, {"op_types": []}, {"keep_float": "everything"}):
        with pytest.raises(ValidationError):
            QuantizeStaticConfig(**bad)


def test_quantizes_weights_and_activations_to_int8(named_model, tmp_path):
    _, model = named_model
    out, ctx = _apply(model, tmp_path)
    assert out.state.kind == "onnx"
    quantized = out.state.onnx_model
    onnx.checker.check_model(quantized)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = _initializers(quantized)
    int8 = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == len([m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))])
    float_weights = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert not float_weights
    # every INT8 weight feeds a DequantizeLinear (a real INT8 file, not fake-quantized floats)
    consumers = {i: n.op_type for n in quantized.graph.node for i in n.input}
    assert all(consumers[t.name] == "DequantizeLinear" for t in int8)
    # the activations feeding each weight layer are quantized too
    producers = _producers(quantized)
    for node in quantized.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert producers[node.input[0]].op_type == "DequantizeLinear", node.name
    err, out_range = _max_error(model, quantized, ctx.splits.test.x)
    assert err < 0.05 * out_range, (err, out_range)
    assert out.summary["calibration_examples"] == len(ctx.splits.calibration) == 60
    assert out.summary["export_max_abs_diff"] < 1e-4
    assert out.summary["quantized_ops"].get("Gemm", 0) >= 1
    assert out.summary["kept_float"] == [] and out.summary["float_weight_tensors"] == []
    # weight bytes shrink exactly 4x; the whole file less (tiny models: the graph is a large share)
    float_model = export_onnx(model, ctx.example_input)
    float_weight_bytes = sum(len(t.raw_data) for t in float_model.graph.initializer if len(t.dims) >= 2)
    assert 4 * sum(len(t.raw_data) for t in int8) == float_weight_bytes
    assert len(quantized.SerializeToString()) < 0.6 * len(float_model.SerializeToString())


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy", "mse"])
def test_each_calibration_method_works(calibration, tmp_path):
    model = tiny_cnn()
    out, ctx = _apply(model, tmp_path, calibration=calibration, percentile=99.9)
    assert out.summary["calibration"] == calibration
    err, out_range = _max_error(model, out.state.onnx_model, ctx.splits.test.x)
    assert err < 0.05 * out_range, (calibration, err, out_range)


def test_qint8_symmetric_activations_and_per_tensor_weights(tmp_path):
    model = tiny_mlp()
    out, ctx = _apply(model, tmp_path, activation_type="qint8", symmetric_activations=True, per_channel=False)
    quantized = out.state.onnx_model
    q_types = {_initializers(quantized)[n.input[2]].data_type for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {onnx.TensorProto.INT8}
    err, out_range = _max_error(model, quantized, ctx.splits.test.x)
    assert err < 0.05 * out_range


def test_keep_float_glob_leaves_that_layer_float(named_model, tmp_path):
    name, model = named_model
    layer = FINAL_LAYER[name]
    out, ctx = _apply(model, tmp_path, keep_float=(layer,))
    quantized = out.state.onnx_model
    assert out.summary["kept_float"] == [layer]
    inits = _initializers(quantized)
    assert inits[f"{layer}.weight"].data_type == onnx.TensorProto.FLOAT
    kept = next(n for n in quantized.graph.node if n.name == f"/{layer}/Gemm")
    assert kept.input[1] == f"{layer}.weight"  # read directly, no DequantizeLinear in front
    consumers = {i: n.op_type for n in quantized.graph.node for i in n.input}
    assert consumers.get(kept.output[0]) != "QuantizeLinear"
    # the other layers are still INT8
    assert [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    err, out_range = _max_error(model, quantized, ctx.splits.test.x)
    assert err < 0.05 * out_range


def test_unknown_keep_float_pattern_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no layer matches 'classifier.\\*'") as info:
        _apply(tiny_cnn(), tmp_path, keep_float=("classifier.*",))
    assert info.value.where == "quantize.static.keep_float"


def test_empty_calibration_split_is_an_error(tmp_path):
    model = tiny_mlp()
    data = toy_data(100)
    empty = ArrayData(data.x[:0], data.y[:0])
    ctx = make_ctx(model, tmp_path, data=data)
    ctx = ctx.__class__(**{**ctx.__dict__, "splits": Splits(empty, ctx.splits.finetune, ctx.splits.test, "toy", 0)})
    with pytest.raises(InputError, match="calibration split is empty"):
        apply(ModelState("torch", torch_model=model), QuantizeStaticConfig(), ctx)


def test_nan_in_calibration_inputs_is_an_error(tmp_path):
    data = toy_data(200)
    x = data.x.copy()
    x[:, 0, 0, 0] = np.nan  # every example, so the calibration split surely has one
    ctx = make_ctx(tiny_mlp(), tmp_path, data=ArrayData(x, data.y))
    with pytest.raises(InputError, match="non-finite") as info:
        apply(ModelState("torch", torch_model=tiny_mlp()), QuantizeStaticConfig(), ctx)
    assert "input" in str(info.value) and "example 0" in str(info.value)


def test_non_finite_activation_is_an_error_naming_the_tensor(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    proto = export_onnx(model, ctx.example_input)
    for init in proto.graph.initializer:  # the first layer overflows float32 to inf
        if init.name == "1.weight":
            init.CopyFrom(numpy_helper.from_array(np.full((32, 64), 1e38, np.float32), "1.weight"))
    with pytest.raises(InputError, match="/1/Gemm_output_0 has non-finite values during calibration"):
        apply(ModelState("onnx", onnx_model=proto), QuantizeStaticConfig(), ctx)


def test_nothing_to_quantize_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    with pytest.raises(InputError, match="found nothing to quantize"):
        _apply(model, tmp_path, op_types=("MatMul",))


def test_smoothquant_without_layernorm_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="transformer linears"):
        _apply(tiny_mlp(), tmp_path, smoothquant=True)


def test_mse_calibration_beats_minmax_with_an_outlier(tmp_path):
    """One input value 100x the others stretches the min-max range of the input; MSE clips it.

    At 8 bits clipping one value of size V costs ~V^2 and saves ~(V/255)^2/12 on each of N values,
    so MSE clips a lone outlier only among ~1M values: 256 examples x 4096 inputs here.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(256, 4096)).astype(np.float32)
    calibration[0, 7] = 100.0
    test = rng.normal(size=(200, 4096)).astype(np.float32)
    labels = np.zeros(256, np.int64)
    splits = Splits(ArrayData(calibration, labels), ArrayData(calibration, labels),
                    ArrayData(test, labels[:200]), source="outlier", seed=0)
    errors, clipped = {}, {}
    for method in ("minmax", "mse"):
        ctx = make_ctx(model, tmp_path, data=ArrayData(calibration, labels))
        ctx = ctx.__class__(**{**ctx.__dict__, "splits": splits, "example_input": test[:4]})
        out = apply(ModelState("torch", torch_model=model), QuantizeStaticConfig(calibration=method), ctx)
        clipped[method] = out.summary["clipped_tensors"]
        with torch.no_grad():
            ref = model(torch.from_numpy(test)).numpy()
        got = OrtRunner(out.state.onnx_model.SerializeToString(), threads=1).run(test)
        errors[method] = (float(np.abs(got - ref).max()), float(np.abs(got - ref).mean()))
    assert clipped == {"minmax": 0, "mse": 1}
    assert errors["mse"][0] <= errors["minmax"][0], errors
    assert errors["mse"][1] < 0.8 * errors["minmax"][1], errors


def _dequantized_weight(quantized: onnx.ModelProto, weight_name: str) -> np.ndarray:
    inits = _initializers(quantized)
    dq = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight_name)
    q, scale, zp = (numpy_helper.to_array(inits[i]) for i in dq.input)
    shape = [-1] + [1] * (q.ndim - 1) if scale.ndim == 1 else []
    return dequantize(q, scale.reshape(shape), zp.reshape(shape))


def test_per_channel_weights_have_higher_sqnr_than_per_tensor(tmp_path):
    model = tiny_cnn()
    reference = model[3].weight.detach().numpy()  # the conv without BatchNorm: its weight is not folded
    db = {}
    for per_channel in (True, False):
        out, _ = _apply(model, tmp_path / str(per_channel), per_channel=per_channel)
        db[per_channel] = sqnr_db(reference, _dequantized_weight(out.state.onnx_model, "3.weight"))
    assert db[True] >= db[False] >= 30.0, db


def test_output_and_compaction_preserve_onnx_runtime_results(tmp_path):
    """The file is leaner than ORT's raw output (short generated names, float graph outputs), and
    the INT8 computation is unchanged: ORT fuses every layer into an integer kernel."""
    import onnxruntime as ort

    model = tiny_cnn()
    out, _ = _apply(model, tmp_path)
    quantized = out.state.onnx_model
    assert all(n.name == "" for n in quantized.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert {"/0/Conv", "/3/Conv", "/7/Gemm"} <= {n.name for n in quantized.graph.node}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == 2 and "QGemm" in fused and "Conv" not in fused and "Gemm" not in fused


def test_accepts_onnx_input(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path, data=DATA)
    proto = export_onnx(model, ctx.example_input)
    out = apply(ModelState("onnx", onnx_model=proto), QuantizeStaticConfig(calibration="entropy"), ctx)
    assert out.summary["quantized_ops"]["Gemm"] == 2
    assert "export_max_abs_diff" not in out.summary


def test_keep_float_auto_is_wired_to_the_budget(tmp_path):
    from shrinkml.budget import Budget

    model = tiny_cnn()
    ctx = make_ctx(model, tmp_path, data=DATA)
    ctx = ctx.__class__(**{**ctx.__dict__, "budget": Budget(max_drop=1.0)})
    out = apply(ModelState("torch", torch_model=model), QuantizeStaticConfig(keep_float="auto"), ctx)
    assert out.summary["kept_float"] == []  # any drop is within a 100-point budget
    assert "keep_float_auto" in out.summary


def test_float_weights_behind_quantize_linear_are_folded_to_int8(tmp_path):
    """ORT's AddQDQPairToWeight output keeps FP32 weights with a QuantizeLinear in front; folding
    stores the INT8 values instead and computes the same thing."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from shrinkml.quant.calibration import ArrayReader
    from shrinkml.techniques.quantize_static import fold_quantized_weights

    model = tiny_mlp()
    x = DATA.x[:64]
    float_model = export_onnx(model, x[:2])
    onnx.save(float_model, tmp_path / "float.onnx")
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), ArrayReader(x, float_model, 32),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options={"AddQDQPairToWeight": True})
    unfolded = onnx.load(str(tmp_path / "qdq.onnx"))
    assert [t for t in unfolded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    folded = onnx.ModelProto()
    folded.CopyFrom(unfolded)
    assert fold_quantized_weights(folded) == 2
    onnx.checker.check_model(folded)
    assert not [t for t in folded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert len([t for t in folded.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]) == 2
    before = OrtRunner(unfolded.SerializeToString(), threads=1).run(x)
    after = OrtRunner(folded.SerializeToString(), threads=1).run(x)
    np.testing.assert_array_equal(after, before)


def test_smoothquant_improves_a_block_with_outlier_channels(tmp_path):
    from tests.quant.test_smoothquant import PreLNBlock

    model = PreLNBlock().eval()
    rng = np.random.default_rng(0)
    data = ArrayData(rng.normal(size=(600, 16)).astype(np.float32), rng.integers(0, 5, 600))
    db = {}
    for smooth in (False, True):
        out, ctx = _apply(model, tmp_path / str(smooth), data=data, smoothquant=smooth)
        with torch.no_grad():
            ref = model(torch.from_numpy(ctx.splits.test.x)).numpy()
        db[smooth] = sqnr_db(ref, OrtRunner(out.state.onnx_model.SerializeToString(), threads=1).run(ctx.splits.test.x))
    assert out.summary["smoothquant"]["smoothed_groups"] == 1
    assert db[True] > db[False] + 1.0, db


@pytest.mark.parametrize("fill", [float("-inf"), float(np.finfo(np.float32).min)], ids=["sdpa-inf", "eager-lowest"])
def test_mask_fills_stay_float_instead_of_failing(tmp_path, fill):
    """Attention-style masks hold -inf (SDPA) or float32's lowest value (eager attention) by design:
    the nodes around them stay float, the rest is INT8, and the summary says so. (NaN stays an
    error: see the non-finite tests above.)"""
    import torch
    from torch import nn

    from shrinkml.runtimes.onnxruntime import OrtRunner
    from tests.conftest import make_ctx, toy_data

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

        def forward(self, x):
            s = self.fc1(x.flatten(1)).masked_fill(x.flatten(1)[:, :32] < -0.2, fill)
            return self.fc2(torch.softmax(s, dim=1))

    model = Masked().eval()
    ctx = make_ctx(model, tmp_path, data=toy_data(200))
    out = apply(ModelState("torch", torch_model=model), QuantizeStaticConfig(), ctx)
    assert set(out.summary["left_float_for_infinite_values"]) == {"/Where", "/Softmax"}
    assert "mask fill" in out.summary["note"]
    assert out.summary["quantized_ops"].get("Gemm") == 2
    x = ctx.splits.test.x
    got = OrtRunner(out.state.onnx_model.SerializeToString(), threads=1).run(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 0.05


def test_attention_mask_arithmetic_stays_float_and_openvino_runs_padded_batches(tmp_path):
    """The mask addition, the attention scale before it and mean pooling's multiplication by the mask
    stay float (OpenVINO's low-precision passes turned them into NaN for padded batches); the
    Linears are still INT8, and OpenVINO's output matches ONNX Runtime's on padded rows."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("openvino")
    from shrinkml.models.text import TextEncoder
    from shrinkml.runtimes.openvino import OvRunner

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = TextEncoder(transformers.BertModel(config)).eval()
    rng = np.random.default_rng(0)
    x = rng.integers(1, 100, (200, 12)).astype(np.int64)
    for row, length in zip(x, rng.integers(3, 13, len(x))):
        row[length:] = 0  # padded, as tokenized text is
    ctx = make_ctx(model, tmp_path, task="embedding", data=ArrayData(x))
    out = apply(ModelState("torch", torch_model=model), QuantizeStaticConfig(), ctx)
    proto = out.state.onnx_model
    producers = {o: n for n in proto.graph.node for o in n.output}

    def reads_quantized(name: str) -> bool:
        node = next(n for n in proto.graph.node if n.name == name)
        return any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)

    def writes_quantized(name: str) -> bool:
        node = next(n for n in proto.graph.node if n.name == name)
        return any(n.op_type == "QuantizeLinear" and set(node.output) & set(n.input) for n in proto.graph.node)

    left = out.summary["left_float_for_infinite_values"]
    for layer in range(2):
        add = f"/transformer/encoder/layer.{layer}/attention/self/Add"  # scores + mask
        scale = f"/transformer/encoder/layer.{layer}/attention/self/Mul"  # the attention scale before it
        assert add in left and not reads_quantized(add) and not writes_quantized(add), add
        assert scale in left and not writes_quantized(scale), scale
    pooling = next(n for n in proto.graph.node if n.name == "/Mul")  # mean pooling's tokens * mask
    assert "/Mul" in left and not writes_quantized("/Mul")
    assert any(producers.get(i) is not None and producers[i].op_type == "Cast" for i in pooling.input)  # float mask
    assert out.summary["quantized_ops"].get("MatMul", 0) > 0
    path = tmp_path / "q.onnx"
    onnx.save(proto, path)
    batch = ctx.splits.test.x[:16]
    assert (batch == 0).any()
    got = OvRunner(path, threads=1).run(batch)
    assert np.isfinite(got).all()
    ref = OrtRunner(path, threads=1).run(batch)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99
