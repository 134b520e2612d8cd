"""Map ONNX nodes back to the PyTorch modules they came from, so users can name layers the way
they know them (``encoder.layer.0.attention.self.query``) in ``keep_float`` and reports.

The TorchScript exporter names nodes by module scope: ``/layers.0/ff/ff.0/MatMul`` is the MatMul of
module ``layers.0.ff.0``. Each scope segment is the module's name relative to the segment before
it, repeating that segment as a prefix when the parent is a container (``ff`` then ``ff.0``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import onnx

# Ops that carry a layer's weights, float or quantized.
WEIGHT_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "ConvInteger", "MatMulInteger", "QLinearConv",
     "QLinearMatMul", "MatMulNBits"}
)


def module_name(node_name: str) -> str | None:
    """The PyTorch module path encoded in a scoped node name, or None for unscoped nodes.

    >>> module_name("/layers.0/ff/ff.0/MatMul")
    'layers.0.ff.0'
    >>> module_name("/0/Conv")
    '0'
    >>> module_name("Identity_6") is None
    True
    """
    parts = node_name.strip("/").split("/")
    if not node_name.startswith("/") or len(parts) < 2:
        return None
    path: list[str] = []
    previous = None
    for segment in parts[:-1]:
        if previous is not None and segment.startswith(previous + "."):
            path.append(segment[len(previous) + 1 :])
        else:
            path.append(segment)
        previous = segment
    return ".".join(path)


def node_matches(node: onnx.NodeProto, patterns: Iterable[str]) -> bool:
    """True when the node's name matches one of the glob ``patterns``, or its module path does in
    ``shrinkml.layers``' sense (the module or one containing it)."""
    from shrinkml.layers import matches

    patterns = list(patterns)
    module = module_name(node.name)
    return any(fnmatch.fnmatchcase(node.name, p) for p in patterns) or (module is not None and matches(module, patterns))


def weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that hold layer weights (Conv/MatMul/Gemm/Gather and their quantized forms) whose
    weight is an initializer, in graph order."""
    initializers = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    return [
        node
        for node in model.graph.node
        if node.op_type in WEIGHT_OPS and any(name in initializers for name in node.input[:2])
    ]


def select_nodes(model: onnx.ModelProto, patterns: Iterable[str], *, where: str) -> list[str]:
    """Names of the weight nodes matching ``patterns`` (``shrinkml.layers``' meaning); every pattern
    must match something."""
    from shrinkml.layers import no_match_error

    patterns = list(patterns)
    nodes = weight_nodes(model)
    selected = [n.name for n in nodes if node_matches(n, patterns)]
    for pattern in patterns:
        if not any(node_matches(n, [pattern]) for n in nodes):
            raise no_match_error(pattern, [module_name(n.name) or n.name for n in nodes], where=where)
    return selected
