"""Store quantized weights as integers: fold ``QuantizeLinear(float initializer)`` into an INT8
(or UINT8) initializer.

A fake-quantized PyTorch model exports as ``float weight -> QuantizeLinear -> DequantizeLinear``:
the file still holds the float weights (4 bytes each), and the runtime quantizes them at load. This
pass computes the quantized values once, exactly as ONNX ``QuantizeLinear`` does (float32 division,
round half to even, add the zero point, saturate), stores them as an initializer of the zero
point's type feeding the ``DequantizeLinear`` directly, and drops the float weight. Outputs do not
change: the runtime would have computed the same integers.

Scales and zero points may be initializers, ``Constant`` nodes (either is what exporters emit) or
``Identity`` of one of these (the TorchScript exporter deduplicates equal initializers that way).

>>> folded, summary = fold_weight_quantizers(model)  # doctest: +SKIP
>>> summary["folded_weights"]  # doctest: +SKIP
3
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
_INT_TYPES = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16)}

from shrinkml.quant.numerics import quantize_linear  # noqa: E402  (the one QuantizeLinear reference)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value and string constants: not scales


def _constants(graph: onnx.GraphProto) -> tuple[dict[str, np.ndarray], dict[str, onnx.NodeProto]]:
    """Values of the tensors that are known before the graph runs, and the nodes making them."""
    overridable = {i.name for i in graph.input}  # an initializer that is also an input can be fed
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in overridable}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:  # graph order is topological, so Identity chains resolve in one pass
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
                producers[node.output[0]] = node
        elif node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
            producers[node.output[0]] = node
    return values, producers


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:  # subgraphs (If / Loop bodies) may use outer names
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, old, new)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _rename_inputs(sub, old, new)


def _used_names(graph: onnx.GraphProto, used: set[str] | None = None) -> set[str]:
    used = set() if used is None else used
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _used_names(attr.g, used)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _used_names(sub, used)
    used.update(o.name for o in graph.output)
    return used


def fold_weight_quantizers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of ``model`` where every ``QuantizeLinear`` of a float initializer (with constant
    scale and zero point) is replaced by the integer initializer it would compute.

    Returns ``(model, summary)``; ``summary`` has ``folded_weights`` (count), ``folded`` (the float
    initializers replaced), ``integer_bytes`` / ``float_bytes_removed`` (raw tensor bytes) and
    ``skipped`` (``{"node", "reason"}`` for each weight quantizer left as it was). The input model
    is not modified.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    values, producers = _constants(graph)
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}

    folded: list[str] = []
    skipped: list[dict[str, str]] = []
    removed_nodes: set[int] = set()
    new_tensors: list[onnx.TensorProto] = []
    maybe_unused: set[str] = set()
    integer_bytes = float_bytes = 0
    for index, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.input[0]
        tensor = initializers.get(source)
        if tensor is None or tensor.data_type not in _FLOAT_TYPES or source not in values:
            continue  # an activation quantizer, not a weight
        name = node.name or node.output[0]
        scale = values.get(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zero_point = values.get(zp_name) if zp_name else None
        reason = None
        if scale is None or (zp_name and zero_point is None):
            reason = "scale or zero point is computed at run time"
        elif _attr(node, "block_size", 0):
            reason = "blocked quantization is not folded"
        elif zero_point is None and _attr(node, "output_dtype", 0) not in (0, onnx.TensorProto.UINT8):
            reason = "output_dtype without a zero point is not folded"
        elif zero_point is not None and np.dtype(zero_point.dtype) not in _INT_TYPES:
            reason = f"zero point type {zero_point.dtype} is not an 8- or 16-bit integer"
        elif node.output[0] in graph_outputs:
            reason = "its output is a graph output"
        if reason:
            skipped.append({"node": name, "reason": reason})
            continue
        q = quantize_linear(values[source], scale, zero_point, axis=int(_attr(node, "axis", 1)))
        new_name = f"{source}_quantized"
        suffix = 1
        while new_name in taken:
            new_name, suffix = f"{source}_quantized_{suffix}", suffix + 1
        taken.add(new_name)
        new_tensors.append(numpy_helper.from_array(q, new_name))
        _rename_inputs(graph, node.output[0], new_name)
        removed_nodes.add(index)
        maybe_unused.update([source, node.input[1], zp_name])
        folded.append(source)
        integer_bytes += q.nbytes
        float_bytes += values[source].nbytes

    if not folded:
        return model, _summary(folded, skipped, 0, 0)
    kept_nodes = [n for i, n in enumerate(graph.node) if i not in removed_nodes]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(new_tensors)
    # drop what only the removed quantizers used: the float weights, and scale/zero-point constants
    # that no DequantizeLinear shares (repeat: removing an Identity can orphan its Constant)
    while True:
        used = _used_names(graph)
        dead = {n for n in maybe_unused if n and n not in used}
        if not dead:
            break
        maybe_unused -= dead
        for n in dead:
            producer = producers.get(n)
            if producer is not None:
                maybe_unused.update(producer.input)
        keep_init = [t for t in graph.initializer if t.name not in dead]
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
        keep = [n for n in graph.node if not (n.output and all(o in dead for o in n.output)
                                              and n.op_type in ("Constant", "Identity"))]
        del graph.node[:]
        graph.node.extend(keep)
    live = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    keep_vi = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return model, _summary(folded, skipped, integer_bytes, float_bytes)


def _summary(folded: list[str], skipped: list[dict[str, str]], integer_bytes: int, float_bytes: int) -> dict[str, Any]:
    return {
        "folded_weights": len(folded),
        "folded": folded,
        "integer_bytes": int(integer_bytes),
        "float_bytes_removed": int(float_bytes),
        "skipped": skipped,
    }
