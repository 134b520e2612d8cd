"""``quantize.qat``: quantization-aware training, exported as an INT8 QDQ ONNX model.

Every ``nn.Conv2d`` / ``nn.Linear`` (except ``keep_float``) is replaced by a fake-quantized copy
(:mod:`shrinkml.quant.fake_quant`): INT8 weights (symmetric, per output channel by default), UINT8
activations at the layer's input and output with ranges observed as a moving average. The model
trains through the rounding with the straight-through estimator, on the fine-tune split only,
learning from the labels and / or from the original model (distillation, like ``finetune``).

The result is exported the way ``quantize.static`` ships its models: ``QuantizeLinear`` /
``DequantizeLinear`` pairs around each quantized layer, which ONNX Runtime fuses into integer kernels
(``QLinearConv``, ``QGemm``). The exporter writes the weights as float initializers feeding a
``QuantizeLinear``; :func:`shrinkml.quant.onnx_fold.fold_weight_quantizers` replaces each with the
INT8 tensor it computes, so the weights are INT8 on disk.

Before training, the activation ranges are calibrated on the calibration split with rounding off;
after ``freeze_observers_after`` of the training steps they stop moving, so the last steps train
against the ranges that will ship. BatchNorm2d layers right after a quantized Conv2d in an
``nn.Sequential`` are folded into the conv first; other BatchNorms keep their running statistics
(evaluation mode) during training.

>>> config = QuantizeQATConfig(epochs=3, lr=1e-4)
>>> result = apply(state, config, ctx)  # doctest: +SKIP
>>> result.summary["folded_weights"]  # doctest: +SKIP
12
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register
from shrinkml.techniques.finetune import distillation_loss, training_data

if TYPE_CHECKING:
    import onnx
    from torch import nn

WHERE = "quantize.qat"
# Examples of the calibration split used to initialise the activation ranges.
CALIBRATION_EXAMPLES = 1024
# The fused integer kernels ONNX Runtime picks for a QDQ graph (reported, so "INT8" is checked).
_INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
                "MatMulInteger", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool")
_FLOAT_COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


class QuantizeQATConfig(StepConfig):
    """Hyperparameters of quantization-aware training."""

    technique: Literal["quantize.qat"] = Field(
        "quantize.qat", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    epochs: int = Field(3, ge=1, le=10_000, description="passes over the fine-tune split")
    lr: float = Field(1e-4, gt=0, lt=10, description="learning rate (Adam)")
    batch_size: int = Field(64, ge=1, description="training (and calibration) examples per step")
    distill: bool = Field(True, description="learn from the original model's outputs too")
    temperature: float = Field(4.0, gt=0, description="softening temperature of the distillation KL")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss (1 = only KL)")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    symmetric_activations: bool = Field(False, description="int8 activations with zero point 0 (else uint8)")
    observer_momentum: float = Field(0.9, gt=0, lt=1, description="EMA momentum of activation ranges")
    freeze_observers_after: float = Field(
        0.5, ge=0, le=1, description="fraction of the training steps after which activation ranges stay fixed"
    )
    keep_float: tuple[str, ...] = Field(
        (), description="module-name globs of layers left in float (a module and everything inside it)")


def _check_keep_float(model: nn.Module, patterns: tuple[str, ...]) -> None:
    from shrinkml.layers import select
    from shrinkml.quant.fake_quant import quantizable_layers

    select(quantizable_layers(model), patterns, where=f"{WHERE}.keep_float", what="Linear / Conv2d layers")


def _calibrate(model: nn.Module, x: np.ndarray, batch_size: int) -> int:
    """Initialise every activation range from float activations (rounding off)."""
    import torch

    from shrinkml.quant.fake_quant import set_observing, set_quantizing

    x = x[:CALIBRATION_EXAMPLES]
    model.eval()
    set_quantizing(model, False)
    set_observing(model, True)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])))
    set_quantizing(model, True)
    return len(x)


def _train_mode(model: nn.Module) -> None:
    """Training mode, except BatchNorm keeps its running statistics (they are what ships)."""
    from torch import nn

    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def ort_kernel_counts(model: onnx.ModelProto, threads: int) -> dict[str, dict[str, int]]:
    """The integer and float compute ops in the graph ONNX Runtime's CPU provider will run (after
    its QDQ fusions), read back from the session."""
    import tempfile
    from pathlib import Path

    import onnx

    from shrinkml.runtimes.onnxruntime import session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        # EXTENDED has every QDQ fusion; ALL adds only hardware-specific layouts on top
        session(model.SerializeToString(), threads=threads, optimization="ORT_ENABLE_EXTENDED", optimized_path=path)
        placed = onnx.load(str(path))
    integer: dict[str, int] = {}
    float_ops: dict[str, int] = {}
    for node in placed.graph.node:
        if node.op_type in _INTEGER_OPS:
            integer[node.op_type] = integer.get(node.op_type, 0) + 1
        elif node.op_type in _FLOAT_COMPUTE_OPS:
            float_ops[node.op_type] = float_ops.get(node.op_type, 0) + 1
    return {"integer": integer, "float": float_ops}


def _train(
    model: nn.Module, state: ModelState, config: QuantizeQATConfig, ctx: StepContext, use_labels: bool
) -> tuple[list[dict[str, Any]], int]:
    """Train through the fake quantization on the fine-tune split; returns the per-epoch history and
    the step at which the activation ranges stopped moving."""
    import torch

    from shrinkml.quant.fake_quant import set_observing

    data = ctx.splits.finetune
    teacher = ctx.teacher.eval() if config.distill else None
    params = dict(model.named_parameters())
    masks = {n: params[n].detach() != 0 for n in state.sparse_params if n in params}
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng(ctx.seed)
    x_all = torch.from_numpy(np.ascontiguousarray(data.x))
    y_all = torch.from_numpy(data.y.astype(np.int64)) if use_labels else None
    batches_per_epoch = max(1, math.ceil(len(data) / config.batch_size))
    total_steps = config.epochs * batches_per_epoch
    freeze_step = int(round(config.freeze_observers_after * total_steps))
    history, step = [], 0
    set_observing(model, freeze_step > 0)
    with ctx.progress.bar("quantize.qat", total=total_steps) as bar:
        for epoch in range(config.epochs):
            _train_mode(model)
            perm = rng.permutation(len(data))
            running = 0.0
            for i in range(batches_per_epoch):
                if step == freeze_step:
                    set_observing(model, False)
                b = torch.from_numpy(perm[i * config.batch_size : (i + 1) * config.batch_size])
                xb = x_all[b]
                with torch.no_grad():
                    tb = teacher(xb) if teacher is not None else None
                yb = y_all[b] if y_all is not None else None
                loss = distillation_loss(model(xb), tb, yb, config, use_labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss {float(loss)} at epoch {epoch + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if masks:
                    with torch.no_grad():
                        for name, mask in masks.items():
                            params[name].mul_(mask)
                running += float(loss.detach())
                step += 1
                bar.advance(1, status=f"epoch {epoch + 1} loss {running / (i + 1):.4f}")
            history.append({"epoch": epoch + 1, "train_loss": round(running / batches_per_epoch, 6)})
    return history, freeze_step


@register("quantize.qat", QuantizeQATConfig, accepts=("torch",), produces="onnx", stage="quantize")
def apply(state: ModelState, config: QuantizeQATConfig, ctx: StepContext) -> StepResult:
    import torch

    from shrinkml.quant.fake_quant import freeze, prepare_qat, quantizable_layers
    from shrinkml.quant.onnx_fold import fold_weight_quantizers
    from shrinkml.runtimes.export import export_onnx

    data, use_labels = training_data(
        ctx,
        distill=config.distill,
        technique=WHERE,
        alternative="use quantize.static (post-training quantization) instead",
    )
    if config.per_channel and ctx.opset < 13:
        raise InputError(
            "per-channel QuantizeLinear needs ONNX opset 13 or later",
            where=f"{WHERE}.per_channel",
            found=f"opset {ctx.opset}",
            fix="export with opset >= 13, or set per_channel: false",
        )
    _check_keep_float(state.torch_model, config.keep_float)

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model, quantized, folded_bn = prepare_qat(
        state.torch_model,
        per_channel=config.per_channel,
        symmetric_activations=config.symmetric_activations,
        momentum=config.observer_momentum,
        keep_float=config.keep_float,
    )
    if not quantized:
        raise InputError(
            "quantize.qat found no layer to quantize",
            where=WHERE,
            expected="nn.Linear or nn.Conv2d layers outside keep_float",
            found=f"{len(quantizable_layers(state.torch_model))} such layers, all kept float",
            fix="shorten keep_float, or use quantize.dynamic for other layer types",
        )
    calibration_x = ctx.splits.calibration.x if len(ctx.splits.calibration) else data.x
    try:
        calibration_examples = _calibrate(model, calibration_x, config.batch_size)
        history, freeze_step = _train(model, state, config, ctx, use_labels)
    except FloatingPointError as exc:
        raise InputError(
            f"quantize.qat met a non-finite value ({exc})",
            where=WHERE,
            expected="finite inputs and activations",
            fix="check the calibration and fine-tune data for NaN / inf, or lower lr",
        ) from exc
    freeze(model)
    model.eval()

    exported = export_onnx(model, ctx.example_input, opset=ctx.opset)
    folded, fold_summary = fold_weight_quantizers(exported)
    diff, reference_max, quantization_error = _export_check(model, folded, ctx, state.torch_model)
    # ONNX Runtime's integer kernels requantize with their own rounding (and sum in another order):
    # a value on a rounding boundary lands one step away, and later layers carry that step on. In a
    # deep transformer these single-step flips compound (all-MiniLM-L6-v2: bit-identical first
    # layers, then a growing difference), so the bound is the larger of 5% of the output range and
    # the quantization error itself (the QAT model's own difference from the float model): an
    # export no further from the QAT model than quantization noise. A wrong scale, a wrong op or a
    # garbled layer moves outputs by the output range, far past this bound; the deployed model's
    # accuracy is what the test split measures either way.
    tolerance = max(ctx.export_tolerance, 0.05 * reference_max, quantization_error)
    if not np.isfinite(diff) or diff > tolerance:
        raise InputError(
            "the ONNX export of the quantization-aware model does not match PyTorch",
            where=f"{WHERE} export",
            expected=f"max abs difference <= {tolerance:.3g} (the larger of 5% of the output range and the"
            f" QAT model's own difference from the float model, {quantization_error:.3g})",
            found=f"{diff:.3g}",
            fix="report this with the model; as a workaround keep the mismatching layers in keep_float",
        )
    kernels = ort_kernel_counts(folded, ctx.threads)
    all_layers = quantizable_layers(state.torch_model)
    summary: dict[str, Any] = {
        "epochs_run": len(history),
        "train_examples": int(len(data)),
        "calibration_examples": calibration_examples,
        "used_labels": use_labels,
        "distill": config.distill,
        "quantized_layers": quantized,
        "kept_float": [n for n in all_layers if n not in quantized],
        "folded_batchnorms": folded_bn,
        "observers_frozen_after_step": freeze_step,
        "history": history,
        "export_max_abs_diff": diff,
        "export_tolerance": tolerance,
        "qat_vs_float_max_abs_diff": quantization_error,
        "folded_weights": fold_summary["folded_weights"],
        "ort_integer_ops": kernels["integer"],
        "ort_float_compute_ops": kernels["float"],
    }
    new_state = ModelState("onnx", onnx_model=folded, sparse_params=state.sparse_params, export_max_abs_diff=diff)
    return StepResult(new_state, summary)


def _export_check(
    model: nn.Module, exported: onnx.ModelProto, ctx: StepContext, float_model: nn.Module
) -> tuple[float, float, float]:
    """Max abs difference between ONNX Runtime (the shipped INT8 model) and the frozen fake-quant
    PyTorch model on the example input, the largest PyTorch output magnitude, and the max abs
    difference between the fake-quant model and the float model it was trained from."""
    import torch

    from shrinkml.runtimes.onnxruntime import OrtRunner

    x = np.asarray(ctx.example_input)
    if x.dtype.kind == "f":  # token ids stay integers
        x = x.astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).float().numpy().astype(np.float64)
    got = OrtRunner(exported.SerializeToString(), threads=ctx.threads).run(x).astype(np.float64)
    was_training = float_model.training
    float_model.eval()
    with torch.inference_mode():
        original = float_model(torch.from_numpy(x)).float().numpy().astype(np.float64)
    float_model.train(was_training)
    return (float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected))),
            float(np.max(np.abs(expected - original))))
