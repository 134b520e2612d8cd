"""Dynamic INT8 quantization with ONNX Runtime's quantizer: weights stored as INT8 in the ONNX
file, activations quantized on the fly at inference."""

from __future__ import annotations

from typing import Literal

import onnx
from pydantic import Field

from shrinkml.errors import InputError
from shrinkml.runtimes.export import export_verified
from shrinkml.techniques.base import ModelState, StepConfig, StepContext, StepResult, register

# ONNX Runtime's ConvInteger kernel is slower than its FP32 Conv on x86 CPUs, so by default only the
# ops whose INT8 kernels are fast are quantized; add "Conv" to trade speed for a smaller file.
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Attention", "Gather")


class QuantizeDynamicConfig(StepConfig):
    """Weights to INT8 (per output channel by default), activations quantized at run time."""

    technique: Literal["quantize.dynamic"] = "quantize.dynamic"
    weight_type: Literal["qint8", "quint8"] = "qint8"
    per_channel: bool = True
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI overflow safety")
    op_types: tuple[str, ...] = Field(
        DEFAULT_OP_TYPES, min_length=1, description="ONNX op types to quantize"
    )


def _to_onnx(state: ModelState, ctx: StepContext) -> tuple[onnx.ModelProto, dict]:
    if state.kind == "onnx":
        return state.onnx_model, {}
    model, diff = export_verified(
        state.torch_model,
        ctx.example_input,
        tolerance=ctx.export_tolerance,
        threads=ctx.threads,
        opset=ctx.opset,
    )
    return model, {"export_max_abs_diff": diff, "export_tolerance": ctx.export_tolerance}


@register("quantize.dynamic", QuantizeDynamicConfig, accepts=("torch", "onnx"), produces="onnx")
def apply(state: ModelState, config: QuantizeDynamicConfig, ctx: StepContext) -> StepResult:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, summary = _to_onnx(state, ctx)
    float_path = ctx.workdir / "quantize_dynamic.float.onnx"
    pre_path = ctx.workdir / "quantize_dynamic.pre.onnx"
    out_path = ctx.workdir / "quantize_dynamic.int8.onnx"
    onnx.save(model, float_path)
    try:
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
        quantize_dynamic(
            str(pre_path),
            str(out_path),
            weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            op_types_to_quantize=list(config.op_types),
        )
    except Exception as exc:
        raise InputError(
            f"ONNX Runtime could not quantize the model ({type(exc).__name__}: {exc})",
            where="quantize.dynamic",
            fix="try per_channel: false, or restrict op_types",
        ) from exc
    quantized = onnx.load(str(out_path))
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    int_ops = {k: v for k, v in counts.items() if "Integer" in k or "Quant" in k}
    if not int_ops:
        raise InputError(
            "quantize.dynamic found nothing to quantize",
            where="quantize.dynamic.op_types",
            expected=f"the model to contain one of {', '.join(config.op_types)}",
            found="op types " + ", ".join(sorted(counts)),
            fix="add the model's op types (e.g. Conv) to op_types",
        )
    summary["quantized_ops"] = int_ops
    export_diff = summary.get("export_max_abs_diff", state.export_max_abs_diff)
    new_state = ModelState(
        "onnx", onnx_model=quantized, sparse_params=state.sparse_params, export_max_abs_diff=export_diff
    )
    return StepResult(new_state, summary)
