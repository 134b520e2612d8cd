"""OpenVINO's post-training quantization (NNCF) on the ONNX graph: the result stays an ONNX file that
ONNX Runtime and OpenVINO both run.

``mode: int8`` is ``nncf.quantize``: INT8 weights and activations in QDQ form (``QuantizeLinear`` /
``DequantizeLinear`` around each Conv, Gemm and MatMul), activation ranges calibrated on the
calibration split only, with NNCF's bias correction and, for transformers, its transformer patterns
(attention masks, LayerNorm and Softmax paths stay float; SmoothQuant on MatMul inputs).
``weights_int8`` / ``weights_int4`` are ``nncf.compress_weights``, data-free: INT8 (asymmetric,
per output channel) weights behind ``DequantizeLinear``, or INT4 (symmetric, groups of
``group_size``) in ``MatMulNBits`` with the first/last layers and embeddings kept INT8, as NNCF does.

NNCF's ONNX backend collects its statistics with ONNX Runtime; its progress bars and log lines go to
stdout, which ``shrinkml --json`` owns, so they are captured here: warnings reach the summary.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register

if TYPE_CHECKING:
    import onnx

WHERE = "quantize.nncf"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class QuantizeNncfConfig(StepConfig):
    """NNCF post-training quantization (OpenVINO's quantizer) of the ONNX graph."""

    technique: Literal["quantize.nncf"] = Field(
        "quantize.nncf", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    mode: Literal["int8", "weights_int8", "weights_int4"] = Field(
        "int8",
        description="int8: weights and activations INT8 (nncf.quantize, calibrated); weights_int8 /"
        " weights_int4: weights only, data-free (nncf.compress_weights: INT8_ASYM per channel, INT4_SYM in groups)",
    )
    model_type: Literal["auto", "cnn", "transformer"] = Field(
        "auto",
        description="int8: 'transformer' applies NNCF's transformer patterns (needed for attention masks);"
        " 'auto' = transformer when the graph has attention (a MatMul of two activations and a Softmax)",
    )
    preset: Literal["auto", "performance", "mixed"] = Field(
        "auto",
        description="int8: performance = symmetric activations, mixed = asymmetric activations; 'auto' ="
        " NNCF's default (mixed for transformers, performance otherwise)",
    )
    subset_size: int = Field(
        300, ge=1, description="int8: most calibration examples used (capped by the calibration split)"
    )
    fast_bias_correction: bool = Field(
        True, description="int8: NNCF's fast bias correction (false: its slower, more exact BiasCorrection)"
    )
    calibration_batch_size: int = Field(
        1,
        ge=1,
        description="int8: examples per calibration batch; NNCF recommends 1 (batch-wise statistics can be"
        " inaccurate on transformers), larger is faster (ignored for a model with a fixed batch size)",
    )
    group_size: int = Field(
        128, ge=16, description="weights_int4: weights per scale along the input dimension; a power of 2"
    )

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of 2 (MatMulNBits block size), got {value}")
        return value


# --- what the graph is ------------------------------------------------------------------------


def _input_name(model: onnx.ModelProto) -> str:
    """The input whose first axis is the batch (the ids of a text model, or the one input)."""
    from shrinkml.runtimes.feeds import onnx_inputs

    return onnx_inputs(model)[0][0]


def _fixed_batch(model: onnx.ModelProto, name: str) -> int | None:
    value = next(i for i in model.graph.input if i.name == name)
    dims = value.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None


def has_attention(model: onnx.ModelProto) -> bool:
    """A Softmax and a MatMul of two activations (attention scores or their product with values):
    what marks a transformer, whose masks need NNCF's transformer patterns to stay float."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = {n.op_type for n in model.graph.node}
    activation_matmul = any(
        n.op_type == "MatMul" and not (set(n.input) & constants) for n in model.graph.node
    )
    return "Softmax" in ops and activation_matmul


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# layers that compute with weights (or, in attention, with two quantized activations)
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "Gather"})


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Compute layers that read a dequantized tensor, and ``MatMulNBits`` layers, by op type: what
    runs on integer data (pooling or Flatten between two quantizers is not counted)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS and (node.op_type == "MatMulNBits" or set(node.input) & dq_outputs):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _declare_domains(model: onnx.ModelProto) -> list[str]:
    """Add the opset imports of operator domains nodes use but the model does not declare (NNCF
    3.4's ``MatMulNBits`` comes without ``com.microsoft``: ONNX Runtime lets it pass, the ONNX
    checker and other tools do not). Returns the domains added."""
    from onnx import helper

    declared = {o.domain or "" for o in model.opset_import}
    missing = sorted({n.domain for n in model.graph.node if (n.domain or "") not in declared})
    model.opset_import.extend(helper.make_opsetid(domain, 1) for domain in missing)
    return missing


def _integer_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Initializers of 2+ dimensions stored as integers, by element type name (``INT8``, ``UINT8``)."""
    import onnx

    counts: dict[str, int] = {}
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    for t in model.graph.initializer:
        if t.data_type in integer and len(t.dims) >= 2:
            name = onnx.TensorProto.DataType.Name(t.data_type)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# --- running NNCF -------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[list[str]]:
    """NNCF's stdout progress bars discarded and its log handlers replaced by one that keeps its
    warnings (yielded as a list, filled when the block ends)."""
    from nncf.common.logging import nncf_logger

    collect = _Collect()
    handlers, level = nncf_logger.handlers[:], nncf_logger.level
    nncf_logger.handlers = [collect]
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield collect.messages
    finally:
        nncf_logger.handlers = handlers
        nncf_logger.setLevel(level)


def _failed(exc: Exception, fix: str) -> InputError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ["no message"]
    return InputError(
        f"NNCF could not quantize the model ({type(exc).__name__}: {' '.join(lines[:3])})", where=WHERE, fix=fix
    )


def _quantize_int8(model: onnx.ModelProto, config: QuantizeNncfConfig, ctx: StepContext, summary: dict):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    from shrinkml.quant.calibration import calibration_inputs

    name = _input_name(model)
    x = calibration_inputs(ctx.splits.calibration, max_examples=config.subset_size, where=f"{WHERE}.subset_size")
    if config.model_type == "auto":
        transformer = has_attention(model)
        chosen_by = "auto: attention in the graph" if transformer else "auto: no attention in the graph"
    else:
        transformer, chosen_by = config.model_type == "transformer", "config"
    preset = config.preset if config.preset != "auto" else ("mixed" if transformer else "performance")
    fixed = _fixed_batch(model, name)
    batch = fixed or config.calibration_batch_size
    if fixed and len(x) >= fixed:
        x = x[: len(x) - len(x) % fixed]  # a fixed-batch model cannot take a short last batch
    from shrinkml.runtimes.feeds import model_feeds

    batches = [model_feeds(model, x[i : i + batch]) for i in range(0, len(x), batch)]
    ctx.progress.log(
        f"{WHERE}: calibrating ({'transformer' if transformer else 'cnn'}, {preset}) on {len(x)} calibration examples"
    )
    advanced = AdvancedQuantizationParameters(batchwise_statistics=batch > 1)
    with _quiet_nncf() as warnings:
        try:
            quantized = nncf.quantize(
                model,
                nncf.Dataset(batches),
                preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
                subset_size=len(batches),  # NNCF counts dataset items; each item is one batch
                fast_bias_correction=config.fast_bias_correction,
                model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                advanced_parameters=advanced,
            )
        except MemoryError:
            raise
        except Exception as exc:
            raise _failed(exc, "check the model runs in ONNX Runtime, or use quantize.static") from exc
    summary.update(
        model_type="transformer" if transformer else "cnn",
        model_type_chosen_by=chosen_by,
        preset=preset,
        calibration_examples=len(x),
        calibration_batch_size=batch,
        fast_bias_correction=config.fast_bias_correction,
    )
    return quantized, warnings


def _compress_weights(model: onnx.ModelProto, config: QuantizeNncfConfig, ctx: StepContext, summary: dict):
    import nncf

    int4 = config.mode == "weights_int4"
    mode = nncf.CompressWeightsMode.INT4_SYM if int4 else nncf.CompressWeightsMode.INT8_ASYM
    ctx.progress.log(f"{WHERE}: compressing weights ({mode.value}, data-free)")
    with _quiet_nncf() as warnings:
        try:
            compressed = nncf.compress_weights(model, mode=mode, group_size=config.group_size if int4 else None)
        except MemoryError:
            raise
        except Exception as exc:
            fix = "set group_size to a power of 2 that divides every layer's input size" if int4 else (
                "check the model runs in ONNX Runtime, or use quantize.dynamic"
            )
            raise _failed(exc, fix) from exc
    summary.update(nncf_mode=mode.value, calibration_examples=0)
    if int4:
        summary["group_size"] = config.group_size
    return compressed, warnings


@register("quantize.nncf", QuantizeNncfConfig, accepts=("torch", "onnx"), produces="onnx", stage="quantize")
def apply(state: ModelState, config: QuantizeNncfConfig, ctx: StepContext) -> StepResult:
    import nncf

    from shrinkml.techniques.quantize_dynamic import float_onnx
    from shrinkml.techniques.quantize_static import lean_names

    float_model, summary = float_onnx(state, ctx)
    summary = {"nncf_version": nncf.__version__, "mode": config.mode, **summary}
    if config.mode == "int8":
        quantized, warnings = _quantize_int8(float_model, config, ctx, summary)
    else:
        quantized, warnings = _compress_weights(float_model, config, ctx, summary)
    ops = quantized_ops(quantized)
    if not ops:
        raise InputError(
            "quantize.nncf found nothing to quantize",
            where=WHERE,
            expected="Conv, Gemm or MatMul layers with weights",
            found="op types " + ", ".join(sorted(_count_ops(float_model))),
            fix="use a technique for this model's layers",
        )
    # NNCF names every tensor it adds after the tensor it quantizes ("scale_/2/Relu_output_0_1");
    # shorter names change no computation and take 2-3% off a small model's file
    _declare_domains(quantized)
    lean_names(quantized, float_model)
    counts = _count_ops(quantized)
    summary.update(
        quantized_ops=ops,
        quantized_nodes=sum(ops.values()),
        qdq_nodes={op: counts.get(op, 0) for op in QDQ_OPS},
        integer_weight_tensors=_integer_weights(quantized),
    )
    if warnings:
        summary["nncf_warnings"] = warnings
        for message in warnings:
            ctx.progress.log(f"{WHERE}: NNCF warns: {message.splitlines()[0] if message else message}")
    export_diff = summary.get("export_max_abs_diff", state.export_max_abs_diff)
    new_state = ModelState(
        "onnx", onnx_model=quantized, sparse_params=state.sparse_params, export_max_abs_diff=export_diff
    )
    return StepResult(new_state, summary)
