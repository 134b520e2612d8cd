import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shrinkml.measure.macs import onnx_macs, torch_macs
from shrinkml.measure.params import onnx_param_counts, torch_param_counts


class SmallNet(torch.nn.Module):
    """Conv (plain and grouped, strided) + Linear, no BatchNorm so the export is not folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 16)
        self.fc2 = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


# Hand count at batch 1, 3x8x8 input: output elements * (Cin/groups * kH * kW), then in * out.
SMALLNET_MACS = (8 * 8 * 8) * (3 * 3 * 3) + (8 * 4 * 4) * (4 * 3 * 3) + 128 * 16 + 16 * 5
SMALLNET_PARAMS = (8 * 3 * 9 + 8) + (8 * 4 * 9 + 8) + (128 * 16 + 16) + (16 * 5 + 5)


def _small_net(seed: int = 0) -> SmallNet:
    """Weights in {-1, -0.5, 0, 0.5, 1} (about a third zero): exact under int8/uint8 quantization,
    so the quantized graph's nonzeros must equal PyTorch's. All values are random, because the
    legacy exporter merges initializers that happen to be equal."""
    torch.manual_seed(seed)
    net = SmallNet().eval()
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.5, 1.0])
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("weight"):
                param.copy_(levels[torch.randint(0, len(levels), param.shape)])
            else:
                param.copy_(torch.rand(param.shape) + 0.1)
    return net


def _export(net: torch.nn.Module, path: Path, example: torch.Tensor) -> Path:
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy; it is chosen here on purpose (fast, no
        # onnxscript), so the warning is noise in the test output.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[SmallNet, Path]:
    net = _small_net()
    path = _export(net, tmp_path_factory.mktemp("onnx") / "small.onnx", torch.zeros(2, 3, 8, 8))
    return net, path


def _quantize_dynamic(src: Path, dst: Path, weight_type: str, per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=getattr(QuantType, weight_type), per_channel=per_channel)
    return onnx.load(str(dst))


# ------------------------------------------------------------------------------------ params


def test_torch_param_counts_by_hand():
    net = _small_net()
    total, nonzero = torch_param_counts(net)
    assert total == SMALLNET_PARAMS
    expected_nonzero = sum(int((p != 0).sum()) for p in net.parameters())
    assert nonzero == expected_nonzero < total


def test_torch_shared_parameters_count_once():
    shared = torch.nn.Linear(4, 4)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    assert torch_param_counts(net) == (20, 20)


def test_torch_pruning_masks_are_honoured():
    import torch.nn.utils.prune  # noqa: F401 - a submodule torch does not import by itself

    layer = torch.nn.Linear(10, 10)
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.3)
    total, nonzero = torch_param_counts(layer)
    assert total == 110
    assert nonzero == 110 - 30


def test_onnx_export_counts_equal_torch(exported):
    net, path = exported
    assert onnx_param_counts(onnx.load(str(path))) == torch_param_counts(net)


@pytest.mark.parametrize(
    ("weight_type", "per_channel"), [("QInt8", False), ("QUInt8", False), ("QUInt8", True), ("QInt8", True)]
)
def test_dynamic_quantization_keeps_counts(exported, tmp_path, weight_type, per_channel):
    net, path = exported
    quantized = _quantize_dynamic(path, tmp_path / "q.onnx", weight_type, per_channel)
    weight_types = {i.data_type for i in quantized.graph.initializer if i.name.endswith("_quantized")}
    assert weight_types <= {TensorProto.INT8, TensorProto.UINT8} and weight_types
    # Weights are now int8/uint8 with scales and zero points beside them; the count is unchanged,
    # and a pruned weight (stored as the zero point) is still a zero.
    assert onnx_param_counts(quantized) == torch_param_counts(net)


def test_static_qdq_quantization_keeps_counts(exported, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    net, path = exported

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._batches = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self._batches, None)

    dst = tmp_path / "qdq.onnx"
    quantize_static(str(path), str(dst), Reader(), quant_format=QuantFormat.QDQ)
    quantized = onnx.load(str(dst))
    assert any(i.data_type == TensorProto.INT32 for i in quantized.graph.initializer)  # int32 biases
    assert onnx_param_counts(quantized) == torch_param_counts(net)


def _matmul_model(weight: onnx.TensorProto | None, sparse: onnx.SparseTensorProto | None, k: int, n: int):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializer=[weight] if weight is not None else [],
        sparse_initializer=[sparse] if sparse is not None else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sparse_initializer_counts_dense_shape_and_stored_nonzeros():
    k, n = 6, 5
    flat_index = np.array([0, 7, 12, 29], dtype=np.int64)
    values = np.array([1.5, -2.0, 0.0, 3.0], dtype=np.float32)  # one explicitly stored zero
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(values, "W"), numpy_helper.from_array(flat_index, "W_indices"), [k, n]
    )
    model = _matmul_model(None, sparse, k, n)
    assert onnx_param_counts(model) == (k * n, 3)


def test_scalars_and_int64_constants_are_not_parameters():
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "shape")
    eps = numpy_helper.from_array(np.array(1e-5, dtype=np.float32), "eps")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "eps"], ["a"]),
            helper.make_node("Reshape", ["a", "shape"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[weight, shape, eps],
    )
    assert onnx_param_counts(helper.make_model(graph)) == (12, 12)


def test_batchnorm_running_statistics_are_not_parameters(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        for tensor in list(net.parameters()) + list(net.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape) + 0.5)
    model = onnx.load(str(_export(net, tmp_path / "bn.onnx", torch.zeros(2, 8))))
    assert "BatchNormalization" in {node.op_type for node in model.graph.node}
    assert onnx_param_counts(model) == torch_param_counts(net)


def _nbits_model(k: int, n: int, zero_columns: int, symmetric: bool = True) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    weight[:, :zero_columns] = 0.0
    quantizer = MatMulNBitsQuantizer(
        _matmul_model(numpy_helper.from_array(weight, "W"), None, k, n), block_size=32, is_symmetric=symmetric
    )
    quantizer.process()
    return quantizer.model.model


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_counts_logical_elements(symmetric):
    k, n = 64, 32
    model = _nbits_model(k, n, zero_columns=8, symmetric=symmetric)
    assert {node.op_type for node in model.graph.node} == {"MatMulNBits"}
    total, nonzero = onnx_param_counts(model)
    assert total == k * n
    # Feeding the identity returns the dequantized weight: its zeros are the ground truth,
    # including small weights that 4-bit quantization rounded to zero.
    dequantized = _run(model, {"x": np.eye(k, dtype=np.float32)})
    assert nonzero == int(np.count_nonzero(dequantized))
    assert nonzero <= k * (n - 8)


# -------------------------------------------------------------------------------------- MACs


def test_torch_macs_by_hand_and_batch_is_sliced():
    net = _small_net().train()
    assert torch_macs(net, torch.zeros(7, 3, 8, 8)) == SMALLNET_MACS
    assert net.training  # restored


def test_torch_macs_accepts_keyword_inputs():
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(6, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.proj(a) @ b.transpose(-1, -2)

    macs = torch_macs(TwoInputs(), {"a": torch.zeros(4, 5, 6), "b": torch.zeros(4, 2, 3)})
    assert macs == 5 * 6 * 3 + 5 * 2 * 3


def test_onnx_macs_equals_torch_macs(exported):
    net, path = exported
    model = onnx.load(str(path))
    macs = onnx_macs(model, {"x": [1, 3, 8, 8]})
    assert macs == torch_macs(net, torch.zeros(1, 3, 8, 8)) == SMALLNET_MACS
    # Counting works on a copy: the caller's dynamic batch dimension is untouched.
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnx_macs(model, {"x": [4, 3, 8, 8]}) == 4 * SMALLNET_MACS


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_dynamic_quantized_graph_has_float_macs(exported, tmp_path, weight_type):
    _, path = exported
    quantized = _quantize_dynamic(path, tmp_path / "q.onnx", weight_type, per_channel=False)
    ops = {node.op_type for node in quantized.graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops
    assert onnx_macs(quantized, {"x": [1, 3, 8, 8]}) == SMALLNET_MACS


def test_matmul_nbits_macs():
    k, n = 64, 32
    model = _nbits_model(k, n, zero_columns=0)
    assert onnx_macs(model, {"x": [3, k]}) == 3 * k * n


def test_onnx_macs_rejects_unknown_and_missing_inputs(exported):
    model = onnx.load(str(exported[1]))
    with pytest.raises(ValueError, match="not inputs"):
        onnx_macs(model, {"image": [1, 3, 8, 8]})
    with pytest.raises(ValueError, match="dynamic dimensions"):
        onnx_macs(model, {})
