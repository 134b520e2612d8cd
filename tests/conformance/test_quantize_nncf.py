"""Conformance of quantize.nncf (OpenVINO's NNCF on the ONNX graph): a real INT8 QDQ file that ONNX
Runtime and OpenVINO both run, accuracy kept, weight-only modes, transformer detection, calibration
from the calibration split alone, and clean errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.examples.demo import digits_cnn, digits_mlp
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.runtimes.openvino import OvRunner
from shrinkml.techniques.base import ModelState, get_technique
from shrinkml.techniques.quantize_nncf import QuantizeNncfConfig, has_attention
from tests.conftest import make_ctx, tiny_cnn, tiny_mlp, toy_data

# the registered step (what recipes run), which keeps the input spec that NNCF drops from metadata_props
apply = get_technique("quantize.nncf").apply

DATA = toy_data(600)  # 60 calibration, 180 test examples


def _apply(model, tmp_path, data=DATA, **config):
    ctx = make_ctx(model, tmp_path, data=data)
    return apply(ModelState("torch", torch_model=model), QuantizeNncfConfig(**config), ctx), ctx


def _trained(factory, data: ArrayData = DATA, epochs: int = 30) -> nn.Module:
    """``factory()`` fitted on the toy data (seeded init, full batch): accuracy then means something."""
    torch.manual_seed(0)
    model = factory()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _size(model: onnx.ModelProto) -> int:
    return len(model.SerializeToString())


def _float_size(model: nn.Module, x: np.ndarray) -> int:
    return _size(export_onnx(model, x[:4]))


def _outputs(model: onnx.ModelProto, x: np.ndarray, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's and OpenVINO's outputs on the same file."""
    path = tmp_path / "quantized.onnx"
    onnx.save(model, str(path))
    return OrtRunner(path, threads=1).run(x), OvRunner(path, threads=1).run(x)


def _reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_config_defaults_validation_and_round_trip():
    cfg = QuantizeNncfConfig()
    assert (cfg.mode, cfg.model_type, cfg.preset, cfg.subset_size, cfg.fast_bias_correction) == (
        "int8", "auto", "auto", 300, True)
    assert QuantizeNncfConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert all(field.description for field in QuantizeNncfConfig.model_fields.values())
    assert get_technique("quantize.nncf").accepts == {"torch", "onnx"}
    assert get_technique("quantize.nncf").produces == "onnx" and get_technique("quantize.nncf").runtime is None
    for bad in ({"mode": "int2"}, {"model_type": "rnn"}, {"preset": "fast"}, {"subset_size": 0},
                {"group_size": 48}, {"group_size": 8}, {"calibration_batch_size": 0},
                {"fast_bias_correction": "yes"}, {"subset_size": 1.5}, {"subsetsize": 10}):
        with pytest.raises(ValidationError):
            QuantizeNncfConfig(**bad)


def test_int8_cnn_is_smaller_keeps_accuracy_and_runs_on_both_runtimes(tmp_path):
    model = _trained(lambda: digits_cnn(width=8, hidden=32))
    out, ctx = _apply(model, tmp_path)
    quantized = out.state.onnx_model
    onnx.checker.check_model(quantized)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == 4  # two convs, two linears: stored INT8, not fake-quantized floats
    assert not [t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    x, y = ctx.splits.test.x, ctx.splits.test.y
    assert _size(quantized) < 0.4 * _float_size(model, x)
    summary = out.summary
    assert summary["quantized_ops"] == {"Conv": 2, "Gemm": 2} and summary["quantized_nodes"] == 4
    assert summary["model_type"] == "cnn" and summary["preset"] == "performance"
    assert summary["calibration_examples"] == len(ctx.splits.calibration) == 60
    assert summary["nncf_version"].startswith("3.") and summary["export_max_abs_diff"] < 1e-4
    ref = _reference(model, x)
    float_acc = (ref.argmax(1) == y).mean()
    assert float_acc > 0.8
    for got in _outputs(quantized, x, tmp_path):
        assert (got.argmax(1) == y).mean() >= float_acc - 0.02
        assert np.abs(got - ref).mean() < 0.02 * np.ptp(ref)  # 0.006 measured (max 0.09: a few outliers)


def test_weights_int8_mlp_stores_uint8_weights_without_activation_quantizers(tmp_path):
    torch.manual_seed(0)
    model = digits_mlp().eval()
    out, ctx = _apply(model, tmp_path, mode="weights_int8")
    quantized = out.state.onnx_model
    counts = out.summary["qdq_nodes"]
    assert counts == {"QuantizeLinear": 0, "DequantizeLinear": 3}
    assert out.summary["integer_weight_tensors"] == {"UINT8": 3}  # INT8_ASYM: uint8 codes, zero points
    assert out.summary["calibration_examples"] == 0 and out.summary["nncf_mode"] == "int8_asym"
    x = ctx.splits.test.x
    assert _size(quantized) < 0.3 * _float_size(model, x)
    ref = _reference(model, x)
    for got in _outputs(quantized, x, tmp_path):
        assert np.abs(got - ref).max() < 0.02 * np.ptp(ref)


def test_weights_int4_declares_the_contrib_domain_and_runs_on_both_runtimes(tmp_path):
    torch.manual_seed(0)
    model = digits_mlp().eval()
    out, ctx = _apply(model, tmp_path, mode="weights_int4", group_size=32)
    quantized = out.state.onnx_model
    onnx.checker.check_model(quantized)  # NNCF 3.4 leaves com.microsoft undeclared; the step adds it
    assert out.summary["quantized_ops"]["MatMulNBits"] == 2  # the last layer stays INT8, as NNCF does
    x = ctx.splits.test.x
    ref = _reference(model, x)
    for got in _outputs(quantized, x, tmp_path):
        assert np.abs(got - ref).max() < 0.1 * np.ptp(ref)


def test_group_size_that_divides_no_layer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="NNCF could not quantize") as info:
        _apply(tiny_mlp(), tmp_path, mode="weights_int4", group_size=128)  # the first layer has 64 inputs
    assert "group_size" in info.value.fix


def test_calibrates_on_the_calibration_split_only(tmp_path):
    """NaN in the fine-tune and test splits would make every range NaN if either were read; the
    calibration split alone sets the input's scale (scaled x4, the input scale is x4)."""
    model = tiny_cnn()
    ctx = make_ctx(model, tmp_path)
    poisoned = {name: ArrayData(np.full_like(split.x, np.nan), split.y)
                for name, split in (("finetune", ctx.splits.finetune), ("test", ctx.splits.test))}
    splits = Splits(ctx.splits.calibration, poisoned["finetune"], poisoned["test"], ctx.splits.source, ctx.splits.seed)
    config = QuantizeNncfConfig(subset_size=7)
    scales = []
    for factor in (1.0, 4.0):
        calibration = ArrayData(ctx.splits.calibration.x * factor, ctx.splits.calibration.y)
        run = dataclasses.replace(ctx, splits=dataclasses.replace(splits, calibration=calibration))
        out = apply(ModelState("torch", torch_model=model), config, run)
        assert out.summary["calibration_examples"] == 7  # subset_size caps it
        quantized = out.state.onnx_model
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
        first_q = next(n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        scale = float(inits[first_q.input[1]])
        assert np.isfinite(scale) and scale > 0
        scales.append(scale)
    assert scales[1] == pytest.approx(4 * scales[0], rel=1e-3)


def test_empty_calibration_split_is_an_input_error(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    empty = ArrayData(ctx.splits.calibration.x[:0], ctx.splits.calibration.y[:0])
    ctx = dataclasses.replace(ctx, splits=dataclasses.replace(ctx.splits, calibration=empty))
    with pytest.raises(InputError, match="calibration split is empty"):
        apply(ModelState("torch", torch_model=model), QuantizeNncfConfig(), ctx)


def test_nothing_to_quantize_is_an_input_error(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.ReLU()).eval()
    with pytest.raises(InputError, match="found nothing to quantize"):
        _apply(model, tmp_path)


def _tiny_bert() -> nn.Module:
    import transformers

    from shrinkml.models.text import TextEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    return TextEncoder(transformers.BertModel(config)).eval()


def _token_ids(n: int = 200, seq: int = 12) -> ArrayData:
    rng = np.random.default_rng(0)
    x = rng.integers(1, 120, (n, seq)).astype(np.int64)
    for row, length in zip(x, rng.integers(3, seq + 1, n)):
        row[length:] = 0  # padding, masked inside the model
    return ArrayData(x)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_transformer_is_detected_and_quantized_with_nncf_transformer_patterns(tmp_path):
    """With padding the attention mask holds float32's lowest value; NNCF's transformer patterns
    keep that path float. Quantized as a CNN, the real all-MiniLM-L6-v2 fell to a mean cosine of
    0.48 (32 tokens); this 2-layer encoder loses less, but measurably."""
    model, data = _tiny_bert(), _token_ids()
    ctx = make_ctx(model, tmp_path, task="embedding", data=data)
    float_onnx = export_onnx(model, ctx.example_input)
    assert has_attention(float_onnx) and not has_attention(export_onnx(tiny_cnn(), DATA.x[:4]))
    out = apply(ModelState("onnx", onnx_model=float_onnx), QuantizeNncfConfig(), ctx)
    assert out.summary["model_type"] == "transformer" and out.summary["preset"] == "mixed"
    assert out.summary["model_type_chosen_by"] == "auto: attention in the graph"
    assert out.summary["quantized_ops"]["MatMul"] >= 12  # Q, K, V, output, two FFN per layer
    x = ctx.splits.test.x
    ref = OrtRunner(float_onnx.SerializeToString(), threads=1).run(x)
    worst = []
    for got in _outputs(out.state.onnx_model, x, tmp_path):
        cosine = _cosines(got, ref)
        assert cosine.mean() > 0.999, cosine.mean()
        worst.append(cosine.min())
    as_cnn = apply(ModelState("onnx", onnx_model=float_onnx), QuantizeNncfConfig(model_type="cnn"), ctx)
    assert as_cnn.summary["model_type"] == "cnn" and as_cnn.summary["model_type_chosen_by"] == "config"
    got = OrtRunner(as_cnn.state.onnx_model.SerializeToString(), threads=1).run(x)
    assert _cosines(got, ref).min() < min(worst)


def test_nncf_prints_nothing_on_stdout(tmp_path, capfd):
    _apply(tiny_cnn(), tmp_path)
    captured = capfd.readouterr()
    assert captured.out == ""
