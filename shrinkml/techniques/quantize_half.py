"""``quantize.half``: store (and, where the runtime can, compute) the model in 16-bit floats.

- ``float16``: every float initializer and op is converted with ONNX Runtime's converter
  (``onnxruntime.transformers.float16``); inputs and outputs stay float32 by default.
- ``bfloat16``: ONNX Runtime's CPU provider has no bfloat16 kernel for Conv, Gemm, MatMul, Relu or
  Add (1.32), so the weights are *stored* as bfloat16 and cast back to float32 when the session
  loads: the file is about half the size and the compute is float32.

What the CPU actually computes in is read back from ONNX Runtime, not assumed: the step loads the
converted model and looks at the graph ONNX Runtime will run. On x86 CPUs ONNX Runtime 1.32 has no
float16 Conv / Gemm / MatMul kernel either, so it inserts casts and computes those in float32 (even
on CPUs with native FP16 arithmetic such as AVX512-FP16). The summary states both facts; the
report's latency figures show their effect.

>>> config = QuantizeHalfConfig(dtype="float16", keep_float=("classifier",))
>>> result = apply(state, config, ctx)  # doctest: +SKIP
>>> result.summary["compute_dtype"]  # doctest: +SKIP
'float32 (weights stored as float16; ...)'
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register
from shrinkml.techniques.quantize_dynamic import float_onnx

if TYPE_CHECKING:
    import onnx

WHERE = "quantize.half"
# The ops that hold most of the arithmetic: their input type is the model's compute type.
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FP16_MAX = 65504.0
NO_NATIVE_FP16_NOTE = (
    "this CPU has no native FP16 arithmetic; ONNX Runtime may run FP16 ops slower than FP32 — the"
    " report's latency figures show the real effect"
)


class QuantizeHalfConfig(StepConfig):
    """Weights (and, where the runtime supports it, compute) in 16-bit floats."""

    technique: Literal["quantize.half"] = Field(
        "quantize.half", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="16-bit float type of the weights (and of compute, where the runtime has kernels)"
    )
    keep_io_float32: bool = Field(
        True, description="inputs and outputs stay float32, so callers need no change"
    )
    keep_float: tuple[str, ...] = Field(
        (),
        description="layers left in float32: module-name globs or ONNX node names (any op, e.g."
        " '*/Softmax' or 'encoder.*.LayerNorm')",
    )

    @model_validator(mode="after")
    def _bfloat16_keeps_float32_io(self) -> QuantizeHalfConfig:
        if self.dtype == "bfloat16" and not self.keep_io_float32:
            raise ValueError(
                "dtype bfloat16 stores only the weights in bfloat16 (compute stays float32), so inputs"
                " and outputs stay float32: remove keep_io_float32: false"
            )
        return self


def _float32_if_float(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "f" else x


def cpu_native_fp16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU does FP16 arithmetic natively (x86 AVX512-FP16 or AMX-FP16; Arm FP16 SIMD),
    from ``/proc/cpuinfo``. ``f16c`` only converts, so it does not count. None when unknown."""
    from shrinkml.environment import cpu_flags

    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & {"avx512_fp16", "amx_fp16", "asimdhp"})


def _kept_nodes(model: onnx.ModelProto, patterns: Iterable[str]) -> list[str]:
    """Names of the nodes (any op) matching ``patterns``; a pattern matching no node at all is an
    error, raised with the same message as weight-layer selection."""
    from shrinkml.runtimes.onnx_names import node_matches, select_nodes

    patterns = list(patterns)
    kept = [n.name for n in model.graph.node if node_matches(n, patterns)]
    for pattern in patterns:
        if not any(node_matches(n, [pattern]) for n in model.graph.node):
            select_nodes(model, [pattern], where=f"{WHERE}.keep_float")  # raises InputError
    return kept


def _to_float16(model: onnx.ModelProto, kept: list[str], keep_io: bool) -> tuple[onnx.ModelProto, dict[str, Any]]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    kept_set = set(kept)
    out_of_range = 0
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            values = onnx.numpy_helper.to_array(tensor)
            out_of_range += int(np.count_nonzero(np.abs(values) > _FP16_MAX))
    converted = convert_float_to_float16(
        onnx.ModelProto.FromString(model.SerializeToString()),
        keep_io_types=keep_io,
        node_block_list=sorted(kept_set),
    )
    # the converter appends its Cast nodes at the end of the graph; ONNX requires graph order
    OnnxModel.graph_topological_sort(converted.graph)
    was_float = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    n = sum(1 for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16 and t.name in was_float)
    return converted, {"initializers_converted": n, "values_clamped_to_float16_range": out_of_range}


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


def _to_bfloat16(model: onnx.ModelProto, kept: list[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Store float weight tensors (2 or more dimensions: matrices, kernels, embeddings) as bfloat16,
    each followed by a Cast to float32. Biases, norms' scales and scalar constants stay float32:
    they hold little of the size, and bfloat16's 8-bit mantissa would round constants such as
    1/sqrt(d) by up to 0.4%."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    kept_set = set(kept)
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    overridable = {i.name for i in graph.input}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    new_initializers, casts = [], []
    for tensor in graph.initializer:
        users = consumers.get(tensor.name, [])
        if (
            tensor.data_type != onnx.TensorProto.FLOAT
            or tensor.name in overridable
            or len(tensor.dims) < 2
            or not users
            or any(u in kept_set for u in users)
        ):
            new_initializers.append(tensor)
            continue
        stored = f"{tensor.name}_bfloat16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        bits = _bfloat16_bits(onnx.numpy_helper.to_array(tensor))
        bf16 = onnx.helper.make_tensor(stored, onnx.TensorProto.BFLOAT16, list(tensor.dims), bits.tobytes(), raw=True)
        new_initializers.append(bf16)
        casts.append(onnx.helper.make_node("Cast", [stored], [tensor.name], to=onnx.TensorProto.FLOAT,
                                           name=f"{stored}_to_float32"))
    del graph.initializer[:]
    graph.initializer.extend(new_initializers)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model, {"initializers_converted": len(casts)}


def _session(payload: bytes, *, threads: int, level: str, optimized_path: Path | None = None):
    from shrinkml.runtimes.onnxruntime import session

    return session(payload, threads=threads, optimization=level, optimized_path=optimized_path)


def ort_compute_dtypes(payload: bytes, workdir: Path, *, threads: int = 1) -> dict[str, str]:
    """The element type each compute-heavy op (Conv, Gemm, MatMul) runs in on ONNX Runtime's CPU
    provider: the provider casts ops it has no kernel for to float32 when the session loads, so the
    graph it will run (saved with graph optimizations off) shows the real type."""
    import onnx

    type_names = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.BFLOAT16: "bfloat16",
        onnx.TensorProto.DOUBLE: "float64",
    }
    path = workdir / "quantize_half.placed.onnx"
    _session(payload, threads=threads, level="ORT_DISABLE_ALL", optimized_path=path)
    placed = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {t.name: t.data_type for t in placed.graph.initializer}
    for info in [*placed.graph.input, *placed.graph.output, *placed.graph.value_info]:
        types[info.name] = info.type.tensor_type.elem_type
    found: dict[str, set[str]] = {}
    for node in placed.graph.node:
        if node.op_type in _COMPUTE_OPS and node.domain in ("", "ai.onnx"):
            found.setdefault(node.op_type, set()).add(type_names.get(types.get(node.input[0], 0), "unknown"))
    return {op: "/".join(sorted(kinds)) for op, kinds in sorted(found.items())}


def _compute_summary(dtype: str, by_op: dict[str, str], native: bool | None) -> dict[str, Any]:
    kinds = set(by_op.values())
    if dtype == "bfloat16":
        compute = "float32 (weights stored as bfloat16, cast at load)"
    elif kinds == {"float16"}:
        compute = "float16"
    elif kinds == {"float32"}:
        ops = ", ".join(by_op)
        compute = (
            f"float32 (weights stored as float16; ONNX Runtime's CPU provider has no float16 kernel for"
            f" {ops}, so it casts them to float32 at load)"
        )
    elif not kinds:
        compute = "no Conv/Gemm/MatMul in the model"
    else:
        compute = "mixed: " + ", ".join(f"{op} in {kind}" for op, kind in by_op.items())
    notes = []
    if native is False:
        notes.append(NO_NATIVE_FP16_NOTE)
    elif native is None:
        notes.append("whether this CPU has native FP16 arithmetic is unknown; the report's latency figures"
                     " show the real effect")
    if dtype == "float16" and "float32" in kinds:
        notes.append(
            "ONNX Runtime computes these ops in float32 here, with casts between float16 and float32"
            " around them: the file is about half the size, the speed is at best that of float32"
        )
    if dtype == "bfloat16":
        notes.append(
            "ONNX Runtime's CPU provider has no bfloat16 Conv/Gemm/MatMul kernels: only the file is"
            " smaller; in memory the weights are float32 again"
        )
    return {"compute_dtype": compute, "compute_dtype_by_op": by_op, "cpu_native_fp16": native,
            "note": "; ".join(notes)}


@register("quantize.half", QuantizeHalfConfig, accepts=("torch", "onnx"), produces="onnx", stage="quantize")
def apply(state: ModelState, config: QuantizeHalfConfig, ctx: StepContext) -> StepResult:
    float_model, summary = float_onnx(state, ctx)
    kept = _kept_nodes(float_model, config.keep_float) if config.keep_float else []
    if config.dtype == "float16":
        half, details = _to_float16(float_model, kept, config.keep_io_float32)
    else:
        half, details = _to_bfloat16(float_model, kept)
    if details["initializers_converted"] == 0:
        raise InputError(
            "quantize.half found no float32 weights to convert",
            where=WHERE,
            expected="float32 initializers in the model",
            found="none (the model may already be quantized or half precision)",
            fix="apply quantize.half to a float32 model, or remove it from the recipe",
        )
    from shrinkml.runtimes.feeds import model_feeds

    payload = half.SerializeToString()
    try:
        by_op = ort_compute_dtypes(payload, ctx.workdir, threads=ctx.threads)
        runner = _session(payload, threads=ctx.threads, level="ORT_ENABLE_ALL")
        x = _float32_if_float(ctx.example_input)  # token ids stay integers
        feed = x if config.keep_io_float32 or x.dtype.kind != "f" else x.astype(np.float16)
        got = runner.run(None, model_feeds(half, feed))[0].astype(np.float64)
    except Exception as exc:  # ORT raises its own exception types
        raise InputError(
            f"ONNX Runtime cannot run the {config.dtype} model ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            where=WHERE,
            fix="list the failing node in keep_float, or use dtype: bfloat16 (weights only)",
        ) from exc
    reference = _session(float_model.SerializeToString(), threads=ctx.threads, level="ORT_ENABLE_ALL")
    expected = reference.run(None, model_feeds(float_model, x))[0].astype(np.float64)
    summary.update(
        {
            "dtype": config.dtype,
            **_compute_summary(config.dtype, by_op, cpu_native_fp16()),
            "keep_io_float32": config.keep_io_float32,
            "kept_float": kept,
            **details,
            # a check like the export check, on the example batch; accuracy is measured separately
            "max_abs_diff_vs_float32": float(np.max(np.abs(got - expected))),
        }
    )
    export_diff = summary.get("export_max_abs_diff", state.export_max_abs_diff)
    new_state = ModelState(
        "onnx", onnx_model=half, sparse_params=state.sparse_params, export_max_abs_diff=export_diff
    )
    return StepResult(new_state, summary)
