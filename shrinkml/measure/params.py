"""Parameter counts, total and nonzero, of PyTorch modules and ONNX graphs.

Both counts describe the model's *weights*, in logical elements, so that a float model and its
int8 or 4-bit version report the same number of parameters and a pruned model reports fewer
nonzeros. Bytes on disk are measured elsewhere; they are what changes with quantization.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper


def torch_param_counts(module: torch.nn.Module) -> tuple[int, int]:
    """``(params, nonzero_params)`` over ``module.parameters()``, shared parameters counted once,
    plus INT8 weight codes held as ``weight_int8`` buffers.

    Pruning masks left by ``torch.nn.utils.prune`` are honoured: for a parameter ``weight_orig``
    with a buffer ``weight_mask`` the nonzeros are those of ``weight_orig * weight_mask``, which
    is the weight the module actually uses.

    >>> torch_param_counts(torch.nn.Linear(4, 2))
    (10, 10)
    """
    total = nonzero = 0
    seen: set[int] = set()
    for owner in module.modules():
        buffers = dict(owner.named_buffers(recurse=False))
        for name, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            data = param.detach()
            mask = buffers.get(name[: -len("_orig")] + "_mask") if name.endswith("_orig") else None
            if mask is not None:
                data = data * mask
            total += data.numel()
            nonzero += int(torch.count_nonzero(data))
        codes = buffers.get("weight_int8")  # quantize.bf16's INT8 weights are buffers, not parameters
        if codes is not None:
            total += codes.numel()
            nonzero += int(torch.count_nonzero(codes))
    return total, nonzero


# Data types that never hold weights: shape, axes, index and step constants are int64/int32.
# (int32 is let back in below where it is a quantized bias.)
_NON_WEIGHT_TYPES = {
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.UINT32,
    TensorProto.UINT64,
    TensorProto.BOOL,
    TensorProto.STRING,
}

_MS = "com.microsoft"

# Input positions that hold quantization scales and zero points (not weights), by (domain, op).
_QLINEAR_BINARY_AUX = frozenset({1, 2, 4, 5, 6, 7})
_AUX_INPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "QuantizeLinear"): frozenset({1, 2}),
    ("", "DequantizeLinear"): frozenset({1, 2}),
    ("", "DynamicQuantizeLinear"): frozenset({1, 2}),
    (_MS, "QuantizeLinear"): frozenset({1, 2}),
    (_MS, "DequantizeLinear"): frozenset({1, 2}),
    ("", "MatMulInteger"): frozenset({2, 3}),
    ("", "ConvInteger"): frozenset({2, 3}),
    ("", "QLinearConv"): _QLINEAR_BINARY_AUX,
    ("", "QLinearMatMul"): _QLINEAR_BINARY_AUX,
    (_MS, "QLinearConv"): _QLINEAR_BINARY_AUX,
    (_MS, "QLinearAdd"): _QLINEAR_BINARY_AUX,
    (_MS, "QLinearMul"): _QLINEAR_BINARY_AUX,
    # MatMulNBits: A, B, scales, zero_points, g_idx, bias -> only B (1) and bias (5) are weights.
    (_MS, "MatMulNBits"): frozenset({2, 3, 4}),
    # Running mean and variance are buffers in PyTorch, not parameters; count them the same way.
    ("", "BatchNormalization"): frozenset({3, 4}),
}

# Integer positions that do hold weights: a quantized int32 bias is a parameter.
_INT_WEIGHT_INPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "DequantizeLinear"): frozenset({0}),
    (_MS, "DequantizeLinear"): frozenset({0}),
    ("", "QLinearConv"): frozenset({8}),
    (_MS, "QLinearConv"): frozenset({8}),
}


@dataclass(frozen=True)
class _Use:
    domain: str
    op: str
    index: int
    node: onnx.NodeProto


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _uses(graph: onnx.GraphProto) -> dict[str, list[_Use]]:
    uses: dict[str, list[_Use]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                uses[name].append(_Use(_domain(node), node.op_type, index, node))
    return uses


def _dynamic_scales(graph: onnx.GraphProto) -> set[str]:
    """Activation scales computed at run time by DynamicQuantizeLinear (its output 1)."""
    return {
        node.output[1] for node in graph.node if node.op_type == "DynamicQuantizeLinear" and len(node.output) > 1
    }


def _is_aux(use: _Use, dynamic_scales: set[str]) -> bool:
    if use.index in _AUX_INPUTS.get((use.domain, use.op), ()):
        return True
    # quantize_dynamic's per-channel weight scale (1-D, so not caught as a scalar) has no
    # dedicated input slot: it is multiplied with the activation scale by a plain Mul.
    return use.op == "Mul" and any(name in dynamic_scales for name in use.node.input)


def _is_weight(dims: tuple[int, ...], data_type: int, uses: list[_Use], dynamic_scales: set[str]) -> bool:
    if len(dims) == 0:  # scalars: eps, scales, constants of arithmetic
        return False
    if data_type in _NON_WEIGHT_TYPES:
        return any(u.index in _INT_WEIGHT_INPUTS.get((u.domain, u.op), ()) for u in uses)
    if not uses:
        # An unused initializer is still stored in the file; count it, as PyTorch counts an
        # unused parameter.
        return True
    return not all(_is_aux(u, dynamic_scales) for u in uses)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _broadcast_zero_point(zp: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """``zp`` shaped to compare against a weight of ``shape`` quantized along ``axis``."""
    if zp.size == 1:
        return zp.reshape(())
    rank = len(shape)
    axis = axis % rank if rank else 0
    if zp.ndim == 1 and zp.size == shape[axis]:
        return zp.reshape([shape[axis] if i == axis else 1 for i in range(rank)])
    if zp.ndim == rank:  # blocked quantization: one zero point per block along one axis
        for i in range(rank):
            if zp.shape[i] != shape[i] and zp.shape[i] and shape[i] % zp.shape[i] == 0:
                return np.repeat(zp, shape[i] // zp.shape[i], axis=i)
        return zp
    return None


def _zero_point_for(
    name: str, shape: tuple[int, ...], uses: list[_Use], arrays: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The zero point a quantized weight is compared against to find its logical zeros, if any.

    A stored integer equal to the zero point dequantizes to exactly 0.0, so for uint8 weights
    (zero point often 128) counting ``q != 0`` would be wrong in both directions.
    """
    for use in uses:
        key, inputs = (use.domain, use.op), list(use.node.input)
        if key in {("", "DequantizeLinear"), (_MS, "DequantizeLinear")} and use.index == 0:
            zp_index, axis = 2, _attribute(use.node, "axis", 1)
        elif key in {("", "MatMulInteger"), ("", "ConvInteger")} and use.index == 1:
            zp_index, axis = 3, (-1 if use.op == "MatMulInteger" else 0)
        elif key in {("", "QLinearConv"), (_MS, "QLinearConv"), ("", "QLinearMatMul")} and use.index == 3:
            zp_index, axis = 5, (-1 if use.op == "QLinearMatMul" else 0)
        else:
            continue
        if zp_index < len(inputs) and inputs[zp_index] in arrays:
            return _broadcast_zero_point(arrays[inputs[zp_index]], shape, axis)
        return np.zeros((), dtype=np.int64)  # a missing zero point means 0
    return None


def _unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian unpacking of ``bits``-wide unsigned values from uint8 bytes (last axis)."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _matmul_nbits_counts(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """Logical ``(K*N, nonzero)`` of a MatMulNBits weight, not its packed byte count."""
    k, n = int(_attribute(node, "K", 0)), int(_attribute(node, "N", 0))
    bits = int(_attribute(node, "bits", 4))
    block_size = int(_attribute(node, "block_size", 0))
    total = k * n
    packed = arrays.get(node.input[1])
    if packed is None or bits not in (2, 4, 8) or block_size <= 0:
        return total, total  # cannot decode; claim no zeros rather than invent some
    n_blocks = -(-k // block_size)
    q = _unpack_bits(packed.reshape(n, -1).astype(np.uint8), bits)[:, : n_blocks * block_size]
    q = q.reshape(n, n_blocks, block_size)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if not zp_name:
        zp = np.full((n, n_blocks, 1), 1 << (bits - 1), dtype=np.uint8)  # the documented default
    elif zp_name in arrays and arrays[zp_name].dtype == np.uint8:
        zp = _unpack_bits(arrays[zp_name].reshape(n, -1), bits)[:, :n_blocks].reshape(n, n_blocks, 1)
    else:
        return total, total  # float zero points: zeros are not exact integers; claim none
    nonzero = int(np.count_nonzero((q != zp).reshape(n, -1)[:, :k]))
    return total, nonzero


# names share.embeddings gives a shared table's initializers (prefix = the table's name)
SHARED_CODES, SHARED_CODEBOOK, SHARED_OFFSETS = ".shared_codes", ".shared_codebook", ".shared_offsets"


def onnx_param_counts(model: onnx.ModelProto, *, base_dir: str = "") -> tuple[int, int]:
    """``(params, nonzero_params)`` of the weights stored in an ONNX graph.

    Counts dense and sparse initializers in logical elements. Left out: scalars, integer shape
    and index constants, quantization scales and zero points, and BatchNormalization running
    statistics (buffers, not parameters, in PyTorch). Quantized weights count as the float
    weights they replace; their zeros are the stored values equal to the zero point. A
    MatMulNBits weight counts ``K*N`` elements, not its packed bytes, and a shared embedding table
    (``share.embeddings``) counts the ``rows x width`` weights its codes stand for. ``base_dir`` is where
    external data lives, if the model was loaded without it.

    >>> onnx_param_counts(onnx.load("model.onnx"))  # doctest: +SKIP
    (3214, 3100)
    """
    graph = model.graph
    uses = _uses(graph)
    dynamic_scales = _dynamic_scales(graph)
    arrays = {init.name: numpy_helper.to_array(init, base_dir) for init in graph.initializer}
    nbits_weights = {
        node.input[1]: node
        for node in graph.node
        if _domain(node) == _MS and node.op_type == "MatMulNBits" and len(node.input) > 1
    }
    # share.embeddings: uint8 codes index shared vectors of `d` weights in a codebook (M*K, d); the
    # table they stand for has rows x M*d weights (the codebook and offsets are not counted again)
    shared = {name[: -len(SHARED_CODES)] for name in arrays if name.endswith(SHARED_CODES)}
    shared = {p for p in shared if p + SHARED_CODEBOOK in arrays and p + SHARED_OFFSETS in arrays}
    skip = {p + suffix for p in shared for suffix in (SHARED_CODEBOOK, SHARED_OFFSETS)}
    total = nonzero = 0
    for init in graph.initializer:
        name, dims = init.name, tuple(init.dims)
        if name in skip:
            continue
        if name.endswith(SHARED_CODES) and name[: -len(SHARED_CODES)] in shared:
            prefix = name[: -len(SHARED_CODES)]
            codes, book = arrays[name].astype(np.int64), arrays[prefix + SHARED_CODEBOOK]
            table = book[codes + arrays[prefix + SHARED_OFFSETS][None, :]]  # (rows, M, d)
            t, nz = int(table.size), int(np.count_nonzero(table))
        elif name in nbits_weights:
            t, nz = _matmul_nbits_counts(nbits_weights[name], arrays)
        elif _is_weight(dims, init.data_type, uses.get(name, []), dynamic_scales):
            array = arrays[name]
            zp = _zero_point_for(name, array.shape, uses.get(name, []), arrays)
            t = int(array.size)
            nz = int(np.count_nonzero(array != zp)) if zp is not None else int(np.count_nonzero(array))
        else:
            continue
        total += t
        nonzero += nz
    for sparse in graph.sparse_initializer:
        values = sparse.values
        dims = tuple(sparse.dims)
        if not _is_weight(dims, values.data_type, uses.get(values.name, []), dynamic_scales):
            continue
        total += int(np.prod(dims, dtype=np.int64))
        nonzero += int(np.count_nonzero(numpy_helper.to_array(values, base_dir)))
    return total, nonzero
