"""Sparse ONNX initializers: smaller file, identical ONNX Runtime outputs, dense tensors untouched."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from shrinkml.runtimes.onnx_sparse import encode_sparse_initializers


def export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(), (x,), buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"]
        )
    return onnx.load_from_string(buffer.getvalue())


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def matmul_model(w: np.ndarray, *, weight_as_input: bool = False) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    inputs = [helper.make_tensor_value_info("x", elem, [2, w.shape[0]])]
    if weight_as_input:  # old exporters list initializers among the graph inputs
        inputs.append(helper.make_tensor_value_info("w", elem, list(w.shape)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", inputs,
        [helper.make_tensor_value_info("y", elem, [2, w.shape[1]])], [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def mlp_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(4, 256)
    dense = export(model, x)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.masked_fill_(torch.rand_like(layer.weight) < 0.9, 0)
    return dense, export(model, x), x.numpy()


def test_sparse_model_is_smaller_on_disk_and_outputs_identical(mlp_pair, tmp_path):
    _, pruned, x = mlp_pair
    encoded, summary = encode_sparse_initializers(pruned)
    onnx.save(pruned, tmp_path / "dense.onnx")
    onnx.save(encoded, tmp_path / "sparse.onnx")
    dense_bytes, sparse_bytes = (tmp_path / "dense.onnx").stat().st_size, (tmp_path / "sparse.onnx").stat().st_size
    assert sparse_bytes < 0.35 * dense_bytes  # 10% density: 4 B value + 2 or 4 B index per nonzero
    assert summary == {"tensors_encoded": 3, "bytes_before": pruned.ByteSize(), "bytes_after": encoded.ByteSize()}
    assert summary["bytes_after"] == sparse_bytes
    reloaded = onnx.load(tmp_path / "sparse.onnx")
    assert np.array_equal(run(reloaded, {"x": x}), run(pruned, {"x": x}))
    assert len(pruned.graph.sparse_initializer) == 0  # input model not modified


def test_index_width_follows_tensor_size(mlp_pair):
    encoded, _ = encode_sparse_initializers(mlp_pair[1])
    widths = {t.values.name: t.indices.data_type for t in encoded.graph.sparse_initializer}
    # 128x256 = 32768 elements no longer fits int16 indices; 10x256 does.
    assert widths == {"0.weight": TensorProto.INT32, "2.weight": TensorProto.INT32, "4.weight": TensorProto.INT16}
    assert {t.name for t in encoded.graph.initializer} == {"0.bias", "2.bias", "4.bias"}  # biases are small


def test_dense_model_left_unchanged(mlp_pair):
    dense = mlp_pair[0]
    encoded, summary = encode_sparse_initializers(dense)
    assert summary["tensors_encoded"] == 0
    assert encoded.SerializeToString() == dense.SerializeToString()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_with_negative_zeros(dtype):
    rng = np.random.default_rng(0)
    # weight * mask pruning leaves -0.0 for negative weights: those count as zeros too
    w = (rng.standard_normal((64, 96)) * (rng.random((64, 96)) < 0.1)).astype(dtype)
    assert np.signbit(w[w == 0]).any()
    model = matmul_model(w, weight_as_input=True)
    encoded, summary = encode_sparse_initializers(model, min_bytes=0)
    assert summary["tensors_encoded"] == 1
    assert [i.name for i in encoded.graph.input] == ["x"]  # the weight left graph.input too
    sparse = encoded.graph.sparse_initializer[0]
    assert len(sparse.values.raw_data) == np.count_nonzero(w) * w.itemsize
    decoded = np.zeros(w.size, dtype)
    decoded[numpy_helper.to_array(sparse.indices)] = numpy_helper.to_array(sparse.values)
    assert np.array_equal(decoded.reshape(w.shape), w)
    x = rng.standard_normal((2, 64)).astype(dtype)
    assert np.array_equal(run(encoded, {"x": x}), run(model, {"x": x}))


def test_min_bytes_and_break_even_respected():
    small = np.zeros((8, 8), np.float32)
    small[0, 0] = 1
    assert encode_sparse_initializers(matmul_model(small))[1]["tensors_encoded"] == 0  # 256 B < min_bytes
    dense_enough = np.ones((64, 64), np.float32)
    dense_enough[:, ::4] = 0  # 75% density: 6 B per nonzero (value + int16 index) > 4 B per element dense
    assert encode_sparse_initializers(matmul_model(dense_enough))[1]["tensors_encoded"] == 0
    sparse_enough = np.ones((64, 64), np.float32)
    sparse_enough[:, ::3] = sparse_enough[:, 1::3] = 0  # 33% density: 2 B per element
    assert encode_sparse_initializers(matmul_model(sparse_enough))[1]["tensors_encoded"] == 1
