"""Static INT8 quantization in ONNX Runtime: weights and activations INT8, in QDQ format, with
activation ranges calibrated on the calibration split (never the test split).

Weights are stored as INT8 initializers feeding ``DequantizeLinear`` (a real 4x smaller file, not
fake-quantized floats); ONNX Runtime fuses each ``DequantizeLinear -> op -> QuantizeLinear`` group
into an integer kernel (``QLinearConv``, ``QLinearMatMul``, ...) when the session is created.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import onnx

WHERE = "quantize.static"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class QuantizeStaticConfig(StepConfig):
    """INT8 weights and activations (QDQ), activation ranges calibrated on the calibration split."""

    technique: Literal["quantize.static"] = Field(
        "quantize.static", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "minmax", json_schema_extra=searchable(choices=("minmax", "percentile")),
        description="how activation ranges are chosen: min-max, a percentile of |values|, ONNX Runtime's"
        " entropy (KL) method, or the clipping range with the least mean squared quantization error",
    )
    percentile: float = Field(99.99, gt=90, le=100, description="for calibration 'percentile': the percentile of values the range keeps")
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per tensor)")
    symmetric_weights: bool = Field(True, description="weight zero point 0 (needed by the fast integer kernels)")
    symmetric_activations: bool = Field(False, description="activation ranges centered on 0")
    activation_type: Literal["quint8", "qint8"] = Field(
        "quint8", description="activation integer type; quint8 with qint8 weights (U8S8) is the fast path on x86"
    )
    op_types: tuple[str, ...] | None = Field(
        None, min_length=1, description="ONNX op types to quantize; unset = ONNX Runtime's default quantizable set"
    )
    calibration_size: int = Field(256, ge=1, description="most calibration examples used")
    keep_float: Literal["auto"] | tuple[str, ...] = Field(
        (),
        description="layers left in float: module-name globs ('classifier.*') or ONNX node names; 'auto' = the"
        " fewest layers, most sensitive first, needed to meet the run's accuracy budget",
    )
    smoothquant: bool = Field(False, description="SmoothQuant LayerNorm -> Linear groups first (transformers)")
    smoothquant_alpha: float = Field(0.5, ge=0, le=1, description="share of outlier difficulty moved to weights")


def _float_onnx(state: ModelState, config: QuantizeStaticConfig, calib_x: np.ndarray, ctx: StepContext):
    summary: dict = {}
    if state.kind == "onnx":
        if config.smoothquant:
            raise InputError(
                "smoothquant needs the PyTorch model, but this step received an ONNX model",
                where=f"{WHERE}.smoothquant",
                fix="put quantize.static before steps that produce ONNX, or set smoothquant: false",
            )
        return state.onnx_model, summary
    from shrinkml.runtimes.export import float_onnx

    module = None
    if config.smoothquant:
        from shrinkml.quant.smoothquant import smooth_linears

        module, summary["smoothquant"] = smooth_linears(state.torch_model, calib_x, alpha=config.smoothquant_alpha)
    model, export = float_onnx(state, ctx, module=module)
    return model, {**summary, **export}


def fold_quantized_weights(model: onnx.ModelProto) -> int:
    """Replace ``float initializer -> QuantizeLinear`` by the INT8 initializer it computes (in
    place), so the file stores INT8 weights: ``shrinkml.quant.onnx_fold.fold_weight_quantizers``, the
    one folding pass (QAT's exports use it too). Returns how many were folded (0 for ONNX Runtime's
    usual output)."""
    from shrinkml.quant.onnx_fold import fold_weight_quantizers

    folded, summary = fold_weight_quantizers(model)
    if summary["folded_weights"]:
        model.CopyFrom(folded)
    return summary["folded_weights"]


# Ops that ORT still runs on integer kernels when their output stays float (QGemm with float
# output, MatMulIntegerToFloat); a Conv needs a quantized output to become a QLinearConv.
FLOAT_OUTPUT_OPS = ("Gemm", "MatMul")


def float_graph_outputs(model: onnx.ModelProto) -> int:
    """Drop the ``QuantizeLinear -> DequantizeLinear`` pair ONNX Runtime puts on graph outputs
    produced by Gemm/MatMul: re-quantizing the final output only adds error (clipped logits can
    tie), and ORT still runs those layers on integer kernels with float output.
    Returns how many outputs were freed."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    freed = 0
    for output in model.graph.output:
        dq = producers.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0], 0) != 1:
            continue
        source = producers.get(q.input[0])
        if source is None or source.op_type not in FLOAT_OUTPUT_OPS or consumers.get(q.input[0], 0) != 1:
            continue
        if q.input[0] in {o.name for o in model.graph.output}:
            continue
        source.output[list(source.output).index(q.input[0])] = output.name
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
        _quantize_bias(model, source, producers)
        freed += 1
    _drop_unused_initializers(model)
    return freed


def _quantize_bias(model: onnx.ModelProto, node: onnx.NodeProto, producers: dict) -> None:
    """Give a float-output Gemm an int32 bias (scale = input scale x weight scale, as ORT's
    quantizer computes it): ORT fuses ``DQ -> Gemm`` into an integer ``QGemm`` with float output
    only when the bias is dequantized too (its load-time bias quantization needs an output Q)."""
    import onnx
    from onnx import helper, numpy_helper

    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return
    if any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
        return
    inits = {t.name: t for t in model.graph.initializer}
    x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
    bias = inits.get(node.input[2])
    if bias is None or bias.data_type != onnx.TensorProto.FLOAT or x_dq is None or w_dq is None:
        return
    if x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return
    if x_dq.input[1] not in inits or w_dq.input[1] not in inits:
        return
    x_scale = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float32)
    w_scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32)
    b = numpy_helper.to_array(bias).astype(np.float32)
    if x_scale.size != 1 or w_scale.size not in (1, b.size):
        return
    b_scale = (x_scale.reshape(()) * w_scale).astype(np.float32)
    if np.any(b_scale == 0):
        return
    info = np.iinfo(np.int32)
    q = np.clip(np.round(b.astype(np.float64) / b_scale), info.min, info.max).astype(np.int32)
    q_name, s_name, out_name = bias.name + "_quantized", bias.name + "_scale", bias.name + "_dequantized"
    model.graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(b_scale, s_name)])
    position = list(model.graph.node).index(node)
    # a per-channel scale runs along the bias's only axis; the attribute's default (1) is out of range
    # for a 1-D tensor: ONNX Runtime lets it pass, OpenVINO (and the spec) do not
    axis = {"axis": 0} if b_scale.size > 1 else {}
    model.graph.node.insert(position, helper.make_node("DequantizeLinear", [q_name, s_name], [out_name], **axis))
    node.input[2] = out_name


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def lean_names(model: onnx.ModelProto, float_model: onnx.ModelProto) -> None:
    """Shorten what the quantizer added, without changing any computation: its tensors get short
    names (``<w>_quantized`` becomes ``<w>`` again), its Q/DQ nodes go unnamed, and unused opset
    imports, metadata and shape annotations (ORT re-infers them) go. Layer nodes keep their
    scoped names (``/8/Gemm``), which map back to PyTorch modules.

    On the demo CNN, ORT's verbose names (``/5/Relu_output_0_QuantizeLinear_Output``) are 2-3% of
    the INT8 file."""
    graph = model.graph
    original = {i for n in float_model.graph.node for i in [*n.input, *n.output]}
    original |= {t.name for t in float_model.graph.initializer}
    original |= {v.name for v in [*graph.input, *graph.output]}
    present = {i for n in graph.node for i in [*n.input, *n.output]} | {t.name for t in graph.initializer}
    taken = original & present  # original names still in use; a replaced float weight's name is free
    renamed: dict[str, str] = {}
    counter = iter(range(1 << 30))

    def short(name: str) -> str:
        if not name or name in original:
            return name
        if name not in renamed:
            base = name[: -len("_quantized")] if name.endswith("_quantized") else None
            if base is not None and base not in taken and base not in renamed.values():
                renamed[name] = base
            else:
                while (candidate := f"q{next(counter)}") in taken:
                    pass
                renamed[name] = candidate
            taken.add(renamed[name])
        return renamed[name]

    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
        node.doc_string = ""
        if node.op_type in QDQ_OPS:
            node.name = ""
    for init in graph.initializer:
        init.name = short(init.name)
    del graph.value_info[:]
    used_domains = {n.domain or "" for n in graph.node} | {""}
    opsets = [o for o in model.opset_import if (o.domain or "") in used_domains]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    del model.metadata_props[:]
    model.doc_string = ""
    graph.doc_string = ""


ELEMENTWISE = frozenset({"Mul", "Div", "Add", "Sub"})


def _mask_derived(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from the ``attention_mask`` input alone (with constants): its casts,
    reshapes, expansions and the additive mask built from it."""
    derived = {i.name for i in model.graph.input if i.name == "attention_mask"}
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # graph order is topological
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        inputs = [i for i in node.input if i]
        if inputs and any(i in derived for i in inputs) and all(i in derived or i in constants for i in inputs):
            derived.update(node.output)
    return derived


def mask_float_nodes(model: onnx.ModelProto, mask_tensors: set[str]) -> list[str]:
    """Nodes that stay float around attention masks.

    Tensors holding mask fills (-inf, or float32's lowest value) have no usable quantization range:
    the nodes that produce or read them stay float. So do the elementwise nodes that combine a mask
    computed from the ``attention_mask`` input with activations (the mask addition to the attention
    scores, the multiplication of token states by the mask in mean pooling), and the elementwise
    nodes (the attention scale) between a mask addition and the MatMul that computes the scores:
    with those quantized, OpenVINO's low-precision passes move dequantization scales across the mask
    (dividing a mask fill by a scale overflows) and return NaN for padded batches. The MatMuls' inputs
    stay quantized."""
    producers = {out: node for node in model.graph.node for out in node.output}
    derived = _mask_derived(model)
    masks = set(mask_tensors) | derived
    touching = [n for n in model.graph.node if mask_tensors & {*n.input, *n.output}]
    touching += [n for n in model.graph.node if n.op_type in ELEMENTWISE and derived & set(n.input)
                 and not set(n.output) <= derived]
    chosen = {n.name: None for n in touching}
    for node in touching:
        if node.op_type != "Add":
            continue
        stack = [producers[i] for i in node.input if i not in masks and i in producers]
        while stack:
            up = stack.pop()
            if up.op_type not in ELEMENTWISE or up.name in chosen:
                continue
            chosen[up.name] = None
            stack.extend(producers[i] for i in up.input if i in producers)
    return list(chosen)


def _quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op types of the nodes that take a dequantized input (what runs on integer kernels)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS and any(i in dq_outputs for i in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _float_weight_initializers(model: onnx.ModelProto, keep: set[str]) -> list[str]:
    """2-D+ float initializers read directly by a node other than the kept-float ones."""
    import onnx

    float_inits = {
        t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        and len(t.dims) >= 2
    }
    return sorted({i for n in model.graph.node if n.name not in keep for i in n.input if i in float_inits})


def build_quantizer(state: ModelState, config: QuantizeStaticConfig, ctx: StepContext):
    """``(float_model, quantize, summary)``: calibrates once; ``quantize(keep)`` returns the QDQ
    model with the nodes named in ``keep`` left in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from shrinkml.quant.calibration import CalibrationSpec, calibrate, calibration_inputs, default_op_types

    calib_x = calibration_inputs(
        ctx.splits.calibration, max_examples=config.calibration_size, where=f"{WHERE}.calibration"
    )
    model, summary = _float_onnx(state, config, calib_x, ctx)
    workdir = Path(ctx.workdir)
    float_path, pre_path = workdir / "quantize_static.float.onnx", workdir / "quantize_static.pre.onnx"
    onnx.save(model, float_path)
    try:
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
    except Exception as exc:
        raise InputError(
            f"ONNX Runtime could not prepare the model for quantization ({type(exc).__name__}: {exc})",
            where=WHERE,
            fix="check the model runs in ONNX Runtime, or use quantize.dynamic",
        ) from exc
    float_model = onnx.load(str(pre_path))  # node names as the quantizer sees them (BatchNorm folded)
    op_types = list(config.op_types) if config.op_types else default_op_types()
    ctx.progress.log(f"{WHERE}: calibrating ({config.calibration}) on {len(calib_x)} calibration examples")
    spec = CalibrationSpec(
        config.calibration, config.percentile, config.symmetric_activations, config.activation_type == "qint8"
    )
    calibration = calibrate(
        pre_path, calib_x, spec, op_types=op_types, threads=ctx.threads, seed=ctx.seed, workdir=workdir,
        where=f"{WHERE}.calibration",
    )
    # ORT's quantizer takes precomputed ranges through its calibration cache (as min-max ranges,
    # whatever method chose them): one calibration serves every quantize() call below
    # (keep_float: auto makes many).
    # attention masks and the nodes around them stay float in every variant (mask_float_nodes)
    from shrinkml.runtimes.feeds import onnx_spec, set_onnx_spec

    infinite = set(calibration.infinite_tensors)
    forced_float = mask_float_nodes(float_model, infinite)
    cache_path = workdir / "quantize_static.ranges.json"
    save_tensors_data(calibration.to_tensors_data(), cache_path)
    extra_options = {
        "ActivationSymmetric": config.symmetric_activations,
        "WeightSymmetric": config.symmetric_weights,
        # Biases stay float in the file: ORT quantizes them to int32 when it loads the model
        # (its QDQ bias-quantization pass) with bit-identical results, and the file saves the
        # per-channel bias scales ORT would otherwise store next to them.
        "QuantizeBias": False,
    }
    activation_type = QuantType.QUInt8 if config.activation_type == "quint8" else QuantType.QInt8
    counter = itertools.count()

    def quantize(keep: list[str]) -> onnx.ModelProto:
        """The model quantized with the nodes named in ``keep`` left in float."""
        out_path = workdir / f"quantize_static.int8.{next(counter)}.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT logs a warning per skipped tensor
        try:
            quantize_static(
                str(pre_path), str(out_path), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types, per_channel=config.per_channel, activation_type=activation_type,
                weight_type=QuantType.QInt8, nodes_to_exclude=[*keep, *forced_float],
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra_options, calibration_cache_path=str(cache_path),
            )
        except Exception as exc:
            raise InputError(
                f"ONNX Runtime could not quantize the model ({type(exc).__name__}: {exc})",
                where=WHERE,
                fix="try per_channel: false, restrict op_types, or keep the failing layer in float",
            ) from exc
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(out_path))
        out_path.unlink()
        fold_quantized_weights(quantized)
        float_graph_outputs(quantized)
        lean_names(quantized, float_model)
        set_onnx_spec(quantized, onnx_spec(float_model))  # the pre-processing pass drops metadata
        return quantized

    summary.update(
        calibration=config.calibration,
        calibration_examples=calibration.examples,
        calibrated_tensors=len(calibration.ranges),
        clipped_tensors=calibration.clipped_tensors,
    )
    if forced_float:
        summary["left_float_for_infinite_values"] = forced_float
        summary["note"] = (
            f"{len(forced_float)} nodes stay float because tensors they read or write hold mask fill"
            " values (+-inf or |x| >= 1e30, e.g. attention masks) during calibration, which no INT8 range can"
            " represent"
        )
    return float_model, quantize, summary


@register(
    "quantize.static", QuantizeStaticConfig, accepts=("torch", "onnx"), produces="onnx", quantizer=build_quantizer,
    stage="quantize",
)
def apply(state: ModelState, config: QuantizeStaticConfig, ctx: StepContext) -> StepResult:
    import onnx

    from shrinkml.runtimes.onnx_names import module_name, select_nodes

    float_model, quantize, summary = build_quantizer(state, config, ctx)
    if config.keep_float == "auto":
        from shrinkml.quant.sensitivity import choose_keep_float

        kept, summary["keep_float_auto"] = choose_keep_float(float_model, quantize, ctx, where=f"{WHERE}.keep_float")
    else:
        kept = select_nodes(float_model, config.keep_float, where=f"{WHERE}.keep_float") if config.keep_float else []
    quantized = quantize(kept)

    qdq_counts = {op: sum(n.op_type == op for n in quantized.graph.node) for op in QDQ_OPS}
    quantized_ops = _quantized_ops(quantized)
    int8_weights = [
        t for t in quantized.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2
    ]
    if not quantized_ops or qdq_counts["DequantizeLinear"] == 0:
        from shrinkml.quant.calibration import default_op_types

        op_types = list(config.op_types) if config.op_types else default_op_types()
        raise InputError(
            "quantize.static found nothing to quantize",
            where=f"{WHERE}.op_types" if config.op_types else WHERE,
            expected="at least one op ONNX Runtime can quantize (" + ", ".join(op_types[:8]) + ", ...)",
            found="op types " + ", ".join(sorted({n.op_type for n in float_model.graph.node})),
            fix="add the model's op types to op_types, or keep fewer layers in float",
        )
    left_float = _float_weight_initializers(quantized, set(kept))
    summary.update(
        quantized_ops=quantized_ops,
        qdq_nodes=qdq_counts,
        int8_weight_tensors=len(int8_weights),
        float_weight_tensors=left_float,
        kept_float=[module_name(n) or n for n in kept],
        per_channel=config.per_channel,
        activation_type=config.activation_type,
    )
    export_diff = summary.get("export_max_abs_diff", state.export_max_abs_diff)
    new_state = ModelState(
        "onnx", onnx_model=quantized, sparse_params=state.sparse_params, export_max_abs_diff=export_diff
    )
    return StepResult(new_state, summary)
