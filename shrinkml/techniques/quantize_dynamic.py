"""Dynamic INT8 quantization with ONNX Runtime's quantizer: weights stored as INT8 in the ONNX
file, activations quantized on the fly at inference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import onnx

# ONNX Runtime's ConvInteger kernel is slower than its FP32 Conv on x86 CPUs, so by default only the
# ops whose INT8 kernels are fast are quantized; add "Conv" to trade speed for a smaller file.
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Attention", "Gather")


class QuantizeDynamicConfig(StepConfig):
    """Weights to INT8 (per output channel by default), activations quantized at run time."""

    technique: Literal["quantize.dynamic"] = Field(
        "quantize.dynamic", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    weight_type: Literal["qint8", "quint8"] = Field(
        "qint8", description="integer type of the stored weights: signed (qint8) or unsigned (quint8) 8-bit"
    )
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per tensor)",
                              json_schema_extra=searchable(choices=(True, False)))
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI overflow safety")
    op_types: tuple[str, ...] = Field(
        DEFAULT_OP_TYPES, min_length=1, description="ONNX op types to quantize"
    )
    keep_float: Literal["auto"] | tuple[str, ...] = Field(
        (),
        description="layers left in float: module-name globs or ONNX node names; 'auto' keeps the"
        " fewest layers needed to meet the accuracy budget",
    )


def float_onnx(state: ModelState, ctx: StepContext) -> tuple[onnx.ModelProto, dict]:
    """The model as float ONNX (``shrinkml.runtimes.export.float_onnx``: exported and verified
    against PyTorch when it is a torch model)."""
    from shrinkml.runtimes.export import float_onnx as export_float_onnx

    return export_float_onnx(state, ctx)


def build_quantizer(state: ModelState, config: QuantizeDynamicConfig, ctx: StepContext):
    """``(float_model, quantize, summary)``: ``quantize(keep)`` returns the INT8 model with the
    nodes named in ``keep`` left in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, summary = float_onnx(state, ctx)
    float_path = ctx.workdir / "quantize_dynamic.float.onnx"
    pre_path = ctx.workdir / "quantize_dynamic.pre.onnx"
    out_path = ctx.workdir / "quantize_dynamic.int8.onnx"
    onnx.save(model, float_path)
    quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
    # ORT's dynamic quantizer rewrites each Gemm into "<name>_MatMul" + "<name>_Add" before it
    # filters nodes (1.32): exclusions must name the rewritten node, and quantizing Gemm needs the
    # MatMul op type, so original MatMuls the user did not ask for are excluded by name.
    op_types = list(config.op_types)
    unwanted: list[str] = []
    if "Gemm" in op_types and "MatMul" not in op_types:
        op_types.append("MatMul")
        unwanted = [n.name for n in onnx.load(str(pre_path)).graph.node if n.op_type == "MatMul"]

    # ONNX shape inference does not type the outputs of com.microsoft ops (e.g. GatherBlockQuantized
    # after quantize.weight_only); ORT's quantizer then cannot find a tensor's type and stops. Their
    # float outputs are what it needs to assume.
    contrib = any(node.domain not in ("", "ai.onnx") for node in model.graph.node)
    extra_options = {"DefaultTensorType": onnx.TensorProto.FLOAT} if contrib else {}

    def quantize(keep: list[str]) -> onnx.ModelProto:
        try:
            quantize_dynamic(
                str(pre_path),
                str(out_path),
                weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                op_types_to_quantize=op_types,
                nodes_to_exclude=[*keep, *(name + "_MatMul" for name in keep), *unwanted],
                extra_options=extra_options,
            )
        except Exception as exc:
            raise InputError(
                f"ONNX Runtime could not quantize the model ({type(exc).__name__}: {exc})",
                where="quantize.dynamic",
                fix="try per_channel: false, or restrict op_types",
            ) from exc
        return onnx.load(str(out_path))

    return model, quantize, summary


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@register(
    "quantize.dynamic", QuantizeDynamicConfig, accepts=("torch", "onnx"), produces="onnx", quantizer=build_quantizer,
    stage="quantize",
)
def apply(state: ModelState, config: QuantizeDynamicConfig, ctx: StepContext) -> StepResult:
    from shrinkml.runtimes.onnx_names import module_name, select_nodes

    float_model, quantize, summary = build_quantizer(state, config, ctx)
    if config.keep_float == "auto":
        from shrinkml.quant.sensitivity import choose_keep_float

        keep, summary["keep_float_search"] = choose_keep_float(
            float_model, quantize, ctx, where="quantize.dynamic.keep_float"
        )
    else:
        keep = select_nodes(float_model, config.keep_float, where="quantize.dynamic.keep_float")
    quantized = quantize(keep)
    counts = _op_counts(quantized)
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
    summary["kept_float"] = sorted(module_name(name) or name for name in keep)
    export_diff = summary.get("export_max_abs_diff", state.export_max_abs_diff)
    new_state = ModelState(
        "onnx", onnx_model=quantized, sparse_params=state.sparse_params, export_max_abs_diff=export_diff
    )
    return StepResult(new_state, summary)
