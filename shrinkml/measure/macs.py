"""Multiply-accumulates (MACs) of one example, for PyTorch modules and ONNX graphs.

Only the matrix work is counted (convolutions and matrix products), as PyTorch's
``FlopCounterMode`` does: element-wise ops, bias additions and activations are left out on both
sides, so the two counts agree for the same network and a quantized graph reports the MACs of the
float graph it replaces.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import numpy as np
import onnx
import torch

ExampleInput = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def _first_example(example_input: ExampleInput):
    """The batch-of-one slice of a tensor, a tuple of tensors, or keyword tensors."""

    def one(value):
        return value[:1] if isinstance(value, torch.Tensor) and value.dim() > 0 else value

    if isinstance(example_input, torch.Tensor):
        return (one(example_input),), {}
    if isinstance(example_input, Mapping):
        return (), {key: one(value) for key, value in example_input.items()}
    return tuple(one(value) for value in example_input), {}


def torch_macs(module: torch.nn.Module, example_input: ExampleInput) -> int:
    """MACs of a forward pass on ONE example (the input is sliced to batch 1).

    ``example_input`` is a tensor, a tuple of positional tensors or a dict of keyword tensors.
    The module runs in eval mode under ``torch.no_grad()``; its training flag is restored after.

    >>> torch_macs(torch.nn.Linear(4, 2), torch.zeros(8, 4))
    8
    """
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = _first_example(example_input)
    was_training = module.training
    module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(*args, **kwargs)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops()) // 2


# Ops whose MACs are counted, and the input position of their weight (convolutions) or of their
# left operand (matrix products).
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1}
_MATMUL_LEFT = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "MatMulNBits": 0, "FusedMatMul": 0}

# Initializers larger than this are replaced by typed graph inputs before shape inference: shapes
# need only their dims, and leaving the data out keeps models over protobuf's 2 GB limit working.
_KEEP_DATA_ELEMENTS = 1024


def _skeleton(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A data-free copy of ``model`` with its inputs fixed to ``input_shapes``."""
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    initializer_names.update(sparse.values.name for sparse in graph.sparse_initializer)
    real_inputs = [vi for vi in graph.input if vi.name not in initializer_names]
    unknown = sorted(set(input_shapes) - {vi.name for vi in real_inputs})
    if unknown:
        raise ValueError(
            f"input_shapes names {unknown}, which are not inputs of the graph; "
            f"its inputs are {[vi.name for vi in real_inputs]}"
        )

    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    g.name = graph.name
    g.node.extend(graph.node)
    for vi in real_inputs:
        new = g.input.add()
        new.CopyFrom(vi)
        shape = new.type.tensor_type.shape
        if vi.name in input_shapes:
            shape.ClearField("dim")
            for size in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(size)
        elif any(not d.HasField("dim_value") for d in shape.dim):
            raise ValueError(
                f"input {vi.name!r} has dynamic dimensions and no entry in input_shapes; "
                "give its shape at batch size 1"
            )
    for init in graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= _KEEP_DATA_ELEMENTS and not init.external_data:
            g.initializer.append(init)  # small ones may be shapes that data propagation needs
        else:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for sparse in graph.sparse_initializer:
        g.input.append(
            onnx.helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type, list(sparse.dims))
        )
    # Output shapes are left for inference to fill in; a stale "batch" symbol would block them.
    for vi in graph.output:
        g.output.add().name = vi.name
    return out


def _shape_table(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    table: dict[str, list[int] | None] = {}
    graph = model.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        table[vi.name] = [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None
    for init in graph.initializer:
        table[init.name] = list(init.dims)
    return table


def _infer(skeleton: onnx.ModelProto) -> dict[str, list[int] | None]:
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    table = _shape_table(inferred)
    needs_ort = any(table.get(o) is None for node in skeleton.graph.node for o in node.output if o)
    if needs_ort:
        # onnx's own inference stops at contrib ops (com.microsoft MatMulNBits, ...) and at
        # data-dependent shapes (a transformer's attention mask built from Shape/Gather); ONNX
        # Runtime's symbolic inference handles both. Whatever stays unknown makes onnx_macs None.
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            symbolic = SymbolicShapeInference.infer_shapes(skeleton, auto_merge=True, guess_output_rank=True)
        except Exception:  # noqa: BLE001 - best effort; onnx's shapes are kept
            symbolic = None
        if symbolic is not None:
            for name, dims in _shape_table(symbolic).items():
                if table.get(name) is None and dims is not None:
                    table[name] = dims
    return table


def _int_attribute(node: onnx.NodeProto, name: str) -> int | None:
    return next((int(attr.i) for attr in node.attribute if attr.name == name), None)


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, list[int] | None]) -> int | None:
    """MACs of one node, 0 for ops that are not counted, None when a shape is unknown."""
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    if op in _CONV_WEIGHT:
        weight = shapes.get(node.input[_CONV_WEIGHT[op]])
        if op == "ConvTranspose":
            # Each input element is scattered through (Cout/groups * kernel) weights.
            x = shapes.get(node.input[0])
            return None if x is None or weight is None else int(np.prod(x)) * int(np.prod(weight[1:]))
        # Each output element is a dot product over (Cin/groups * kernel) weights.
        return None if out is None or weight is None else int(np.prod(out)) * int(np.prod(weight[1:]))
    if op == "Gemm":
        a = shapes.get(node.input[0])
        if out is None or a is None:
            return None
        return int(np.prod(out)) * int(a[0] if _int_attribute(node, "transA") else a[-1])
    if op in _MATMUL_LEFT:
        a = shapes.get(node.input[_MATMUL_LEFT[op]])
        if op == "MatMulNBits":
            k = _int_attribute(node, "K")
            n = _int_attribute(node, "N")
            if out is None and a is not None and n is not None:
                out = a[:-1] + [n]  # the contrib op's shape rule, when no inference knew it
        elif a is None:
            k = None
        else:
            k = a[-2] if _int_attribute(node, "transA") and len(a) > 1 else a[-1]
        return None if out is None or k is None else int(np.prod(out)) * int(k)
    return 0


def onnx_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> int | None:
    """MACs of one run of ``model`` with its inputs at ``input_shapes`` (use batch size 1).

    Shapes come from ONNX shape inference on a copy; the model is not changed. Counted: Conv,
    ConvTranspose, ConvInteger, QLinearConv, Gemm, MatMul, MatMulInteger, QLinearMatMul and
    com.microsoft MatMulNBits / FusedMatMul. None when a counted node's shapes cannot be inferred:
    an undercount would be a false figure.

    >>> onnx_macs(onnx.load("model.onnx"), {"x": [1, 3, 32, 32]})  # doctest: +SKIP
    1234567
    """
    shapes = _infer(_skeleton(model, input_shapes))
    total = 0
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total

