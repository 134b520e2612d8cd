"""Weight-only INT4 / INT8 quantization of Linear layers, deployed as ONNX Runtime ``MatMulNBits``.

Each ``nn.Linear`` weight is quantized in PyTorch, group-wise along its input dimension, by
round-to-nearest or by GPTQ (:mod:`shrinkml.quant.gptq`); activations stay float. The model is
exported to ONNX, each Linear's ``MatMul`` / ``Gemm`` is replaced by a ``MatMulNBits`` node
(com.microsoft domain) holding exactly those codes, and the float weight is removed from the file:
a 4-bit Linear weight takes ~0.16 of its FP32 bytes with group size 32 (codes, float32 scales and
4-bit zero points). ``quantize_embeddings`` stores ``nn.Embedding`` tables the same way
(``GatherBlockQuantized``); in text encoders the word embeddings are often the largest tensor.

The step checks what it deploys: ONNX Runtime's output on the example input is compared with the
PyTorch model carrying the dequantized weights (``deploy_max_abs_diff``).

Recipe step::

    - technique: quantize.weight_only
      bits: 4
      group_size: 32
      method: gptq          # or rtn
      keep_float: ["classifier"]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.quant.blocks import check_group_size
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

    from shrinkml.quant.gptq import HessianAccumulator
    from shrinkml.quant.weight_codec import GroupQuantized

WHERE = "quantize.weight_only"
_CALIBRATION_BATCH = 16


class QuantizeWeightOnlyConfig(StepConfig):
    """INT4 / INT8 weights of Linear layers, group-wise along the input dimension; float activations."""

    technique: Literal["quantize.weight_only"] = Field(
        "quantize.weight_only", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    bits: Literal[4, 8] = Field(4, description="bits per stored weight code", json_schema_extra=searchable(choices=(4, 8)))
    group_size: int = Field(32, ge=16, description="weights per scale along the input dimension; a power of 2",
                            json_schema_extra=searchable(choices=(32, 64, 128)))
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="round-to-nearest, or GPTQ (error-compensating, uses calibration examples)"
    )
    symmetric: bool = Field(False, description="no zero points (the runtime's default 2**(bits-1) is used)")
    gptq_damp: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, a fraction of its mean diagonal")
    gptq_block_size: int = Field(128, ge=1, description="columns per lazy GPTQ update")
    calibration_size: int = Field(128, ge=1, description="calibration examples for GPTQ and the SQNR report")
    quantize_embeddings: bool = Field(False, description="also store nn.Embedding tables group-quantized")
    keep_float: Literal["auto"] | tuple[str, ...] = Field(
        (), description="layers left in float: module-name globs or ONNX node names, or 'auto' (meet the budget)"
    )

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        check_group_size(value)
        return value


@dataclass
class _Target:
    """One graph node computing with a quantizable module's weight."""

    node: str
    module: str
    op_type: str  # MatMul, Gemm or Gather


# --- finding the layers --------------------------------------------------------------------------


def _initializer_arrays(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attrs(node: onnx.NodeProto) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _find_targets(model: onnx.ModelProto, modules: dict[str, nn.Module]) -> list[_Target]:
    """Nodes whose weight initializer is, bit for bit, the weight of a module in ``modules``."""
    from onnx import numpy_helper
    from torch import nn

    from shrinkml.runtimes.onnx_names import module_name

    inits = _initializer_arrays(model)
    targets = []
    for node in model.graph.node:
        name = module_name(node.name)
        if name not in modules:
            continue
        weight = modules[name].weight.detach().cpu().numpy()
        if isinstance(modules[name], nn.Embedding):
            if node.op_type != "Gather" or node.input[0] not in inits or _attrs(node).get("axis", 0) != 0:
                continue
            expected, stored = weight, numpy_helper.to_array(inits[node.input[0]])
        elif node.op_type == "MatMul" and node.input[1] in inits:
            expected, stored = weight.T, numpy_helper.to_array(inits[node.input[1]])
        elif node.op_type == "Gemm" and node.input[1] in inits:
            attrs = _attrs(node)
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            expected = weight if attrs.get("transB", 0) else weight.T
            stored = numpy_helper.to_array(inits[node.input[1]])
        else:
            continue
        if stored.shape == expected.shape and np.array_equal(stored, expected):
            targets.append(_Target(node.name, name, node.op_type))
    return targets


# --- calibration ---------------------------------------------------------------------------------


def _real_tokens(model: nn.Module, batch: torch.Tensor) -> torch.Tensor | None:
    """``(batch, seq)`` mask of non-padding tokens when ``model`` is a text encoder fed token ids, else None."""
    import torch

    pad = getattr(model, "pad_token_id", None)
    if pad is None or batch.dim() != 2 or batch.dtype not in (torch.int32, torch.int64):
        return None
    return batch != pad


def _input_grams(model: nn.Module, names: list[str], ctx: StepContext, size: int) -> dict[str, HessianAccumulator]:
    """``X^T X`` of each named Linear's inputs on up to ``size`` calibration examples."""
    import torch

    from shrinkml.quant.gptq import HessianAccumulator

    modules = dict(model.named_modules())
    accumulators = {name: HessianAccumulator(modules[name].in_features) for name in names}
    x = ctx.splits.calibration.x[:size]
    token_mask: list[torch.Tensor | None] = [None]  # the current batch's real (non-padding) tokens

    def record(acc: HessianAccumulator, inputs: torch.Tensor) -> None:
        mask = token_mask[0]
        if mask is not None and inputs.dim() >= 3 and inputs.shape[:2] == mask.shape:
            inputs = inputs[mask]  # padding positions never reach the pooled output: no weight in the Hessian
        acc.add(inputs)

    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, args, acc=acc: record(acc, args[0]))
        for name, acc in accumulators.items()
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(x), _CALIBRATION_BATCH):
                batch = torch.as_tensor(x[start : start + _CALIBRATION_BATCH])
                token_mask[0] = _real_tokens(model, batch)
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return accumulators


def _output_sqnr_db(weight: torch.Tensor, dequantized: torch.Tensor, gram: torch.Tensor) -> float:
    """SQNR of ``X W^T`` vs ``X W'^T`` over the calibration rows, from ``G = X^T X`` alone:
    ``||X D^T||^2 = sum((D G) * D)``."""
    w = weight.detach().double()
    d = w - dequantized.double()
    signal = float(((w @ gram) * w).sum())
    noise = float(((d @ gram) * d).sum())
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def _quantize_module(
    name: str, module: nn.Module, config: QuantizeWeightOnlyConfig, grams: dict
) -> GroupQuantized:
    import torch
    from torch import nn

    from shrinkml.quant.weight_codec import rtn_quantize

    weight = module.weight.detach().float().cpu()
    if config.method == "gptq" and isinstance(module, nn.Linear) and grams[name].rows:
        from shrinkml.quant.gptq import gptq_quantize

        try:
            return gptq_quantize(
                weight, grams[name].hessian(), bits=config.bits, group_size=config.group_size,
                symmetric=config.symmetric, damp=config.gptq_damp, block_size=config.gptq_block_size,
            )
        except torch.linalg.LinAlgError as exc:
            raise InputError(
                f"GPTQ could not invert the Hessian of layer {name!r} ({exc})",
                where=f"{WHERE}.gptq_damp",
                expected="a positive definite Hessian after dampening",
                found=f"gptq_damp {config.gptq_damp}",
                fix="raise gptq_damp (e.g. 0.1), give more calibration examples, or use method: rtn",
            ) from exc
    return rtn_quantize(weight, bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)


# --- building the deployed graph -----------------------------------------------------------------


def _rewrite(
    float_model: onnx.ModelProto, targets: list[_Target], quantized: dict[str, GroupQuantized], keep: set[str]
) -> onnx.ModelProto:
    """The float model with every target node not in ``keep`` replaced by its quantized form."""
    import onnx

    from shrinkml.quant.weight_codec import (
        ensure_ms_domain,
        gather_block_quantized_node,
        matmul_nbits_node,
        remove_unused_initializers,
    )

    model = copy.deepcopy(float_model)
    by_node = {t.node: t for t in targets if t.node not in keep}
    added: set[str] = set()
    replaced_weights: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        target = by_node.get(node.name)
        if target is None:
            new_nodes.append(node)
            continue
        q = quantized[target.module]
        prefix = f"{target.module}.weight"
        if target.op_type == "Gather":
            replaced_weights.add(node.input[0])
            new, inits = gather_block_quantized_node(
                node.input[1], node.output[0], q, prefix=prefix, node_name=node.name + f"_Q{q.bits}"
            )
            nodes = [new]
        else:
            replaced_weights.add(node.input[1])
            has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
            mm_out = node.output[0] + "_nbits" if has_bias else node.output[0]
            new, inits = matmul_nbits_node(node.input[0], mm_out, q, prefix=prefix, node_name=node.name + f"_Q{q.bits}")
            nodes = [new]
            if has_bias:  # Gemm's C: bias added after the product, as the float Gemm does
                nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        for init in inits:
            if init.name not in added:
                model.graph.initializer.append(init)
                added.add(init.name)
        new_nodes.extend(nodes)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_unused_initializers(model, replaced_weights)
    ensure_ms_domain(model)
    return model


def _deploy_diff(
    model: nn.Module, quantized: dict[str, GroupQuantized], modules: set[str], onnx_model: onnx.ModelProto, ctx: StepContext
) -> tuple[float, float]:
    """Max abs difference, ONNX Runtime vs PyTorch with the dequantized weights; and the reference's
    largest magnitude (the tolerance is relative to it)."""
    import torch

    from shrinkml.runtimes.onnxruntime import OrtRunner

    reference = copy.deepcopy(model).eval()
    named = dict(reference.named_modules())
    with torch.no_grad():
        for name in modules:
            weight = named[name].weight
            weight.copy_(quantized[name].dequantize().to(weight.dtype).reshape(weight.shape))
        expected = reference(torch.as_tensor(ctx.example_input)).float().numpy()
    got = OrtRunner(onnx_model.SerializeToString(), threads=ctx.threads).run(ctx.example_input)
    return float(np.max(np.abs(got.astype(np.float64) - expected))), float(np.max(np.abs(expected)))


def _keep_nodes(
    keep_float, float_onnx: onnx.ModelProto, build: Callable[[list[str]], onnx.ModelProto], ctx: StepContext
) -> tuple[set[str], dict]:
    if keep_float == "auto":
        from shrinkml.quant.sensitivity import choose_keep_float

        kept, summary = choose_keep_float(float_onnx, build, ctx, where=f"{WHERE}.keep_float")
        return set(kept), {"keep_float_auto": summary}
    if not keep_float:
        return set(), {}
    from shrinkml.runtimes.onnx_names import select_nodes

    return set(select_nodes(float_onnx, keep_float, where=f"{WHERE}.keep_float")), {}


@dataclass
class _Prepared:
    """Everything quantized once, from which any keep-float variant is built cheaply."""

    float_onnx: onnx.ModelProto
    export_diff: float
    modules: dict
    targets: list
    target_modules: list[str]
    quantized: dict
    grams: dict
    linear_names: list[str]
    ragged: list[str]  # embeddings left float: width not a multiple of group_size
    build: Callable[[list[str]], onnx.ModelProto]


def _prepare(state: ModelState, config: QuantizeWeightOnlyConfig, ctx: StepContext) -> _Prepared:
    from torch import nn

    from shrinkml.runtimes.export import state_to_onnx

    model = state.torch_model
    wanted = (nn.Linear, nn.Embedding) if config.quantize_embeddings else (nn.Linear,)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, wanted)}
    # GatherBlockQuantized needs whole groups along the embedding row
    ragged = [n for n, m in modules.items() if isinstance(m, nn.Embedding) and m.embedding_dim % config.group_size]
    modules = {n: m for n, m in modules.items() if n not in ragged}
    if not modules:
        kinds = sorted({type(m).__name__ for m in model.modules() if next(m.parameters(recurse=False), None) is not None})
        raise InputError(
            "quantize.weight_only found nothing to quantize",
            where=WHERE,
            expected="nn.Linear layers (weight-only quantization stores Linear weights as INT4/INT8)",
            found="layers with weights: " + (", ".join(kinds) or "none"),
            fix="use quantize.dynamic or quantize.static for convolutional models",
        )

    float_onnx, export_diff = state_to_onnx(
        state, example=ctx.example_input, tolerance=ctx.export_tolerance, threads=ctx.threads, opset=ctx.opset
    )
    targets = _find_targets(float_onnx, modules)
    if not targets:
        raise InputError(
            "quantize.weight_only found no Linear layer in the exported graph",
            where=WHERE,
            expected="MatMul or Gemm nodes whose weight is a Linear layer's weight",
            found=f"{len(modules)} Linear/Embedding modules, none of them as a constant-weight MatMul/Gemm/Gather",
            fix="check that the model's Linear layers run in its forward pass",
        )
    target_modules = sorted({t.module for t in targets}, key=list(modules).index)
    linear_names = [n for n in target_modules if isinstance(modules[n], nn.Linear)]

    ctx.progress.log(f"{WHERE}: recording calibration inputs of {len(linear_names)} Linear layers")
    grams = _input_grams(model, linear_names, ctx, config.calibration_size)
    ctx.progress.log(f"{WHERE}: quantizing to {config.bits} bits ({config.method}, group {config.group_size})")
    quantized = {name: _quantize_module(name, modules[name], config, grams) for name in target_modules}

    def build(keep: list[str]) -> onnx.ModelProto:
        """The deployed model with the nodes named in ``keep`` (and their modules' other nodes) float."""
        kept_modules = {t.module for t in targets if t.node in set(keep)}
        return _rewrite(float_onnx, targets, quantized, {t.node for t in targets if t.module in kept_modules})

    return _Prepared(
        float_onnx, export_diff, modules, targets, target_modules, quantized, grams, linear_names, ragged, build
    )


def build_quantizer(state: ModelState, config: QuantizeWeightOnlyConfig, ctx: StepContext):
    """``(float_model, quantize, summary)``: weights quantized once (RTN or GPTQ); ``quantize(keep)``
    deploys them as MatMulNBits with the nodes named in ``keep`` left in float."""
    prepared = _prepare(state, config, ctx)
    return prepared.float_onnx, prepared.build, {"export_max_abs_diff": prepared.export_diff}


@register(
    "quantize.weight_only", QuantizeWeightOnlyConfig, accepts=("torch",), produces="onnx", quantizer=build_quantizer,
    stage="quantize",
)
def apply(state: ModelState, config: QuantizeWeightOnlyConfig, ctx: StepContext) -> StepResult:
    from torch import nn

    model = state.torch_model
    p = _prepare(state, config, ctx)
    float_onnx, export_diff, modules, targets = p.float_onnx, p.export_diff, p.modules, p.targets
    target_modules, quantized, grams, build = p.target_modules, p.quantized, p.grams, p.build
    linear_names, ragged = p.linear_names, p.ragged
    keep_nodes, extra = _keep_nodes(config.keep_float, float_onnx, build, ctx)
    kept_modules = {t.module for t in targets if t.node in keep_nodes}
    quantized_modules = [n for n in target_modules if n not in kept_modules]
    if not quantized_modules:
        auto = config.keep_float == "auto"
        raise InputError(
            "keep_float: auto meets the budget only with every layer in float" if auto
            else "keep_float leaves no layer to quantize",
            where=f"{WHERE}.keep_float",
            expected="at least one layer outside keep_float",
            found="all of " + ", ".join(target_modules),
            fix="loosen the budget or use bits: 8" if auto else "keep fewer layers in float",
        )
    deployed = build(sorted(keep_nodes))

    deploy_diff, magnitude = _deploy_diff(model, quantized, set(quantized_modules), deployed, ctx)
    tolerance = ctx.export_tolerance * max(1.0, magnitude)
    if not np.isfinite(deploy_diff) or deploy_diff > tolerance:
        raise InputError(
            "ONNX Runtime's MatMulNBits model does not reproduce PyTorch with the same quantized weights",
            where=WHERE,
            expected=f"max abs difference <= {tolerance:.3g}",
            found=f"{deploy_diff:.3g}",
            fix="report this as a shrinkml bug; meanwhile try bits: 8 or keep the affected layers in float",
        )

    layers = {}
    for name in quantized_modules:
        q, weight = quantized[name], modules[name].weight
        w = weight.detach().double()  # bytes_before: as stored in the float export (float32)
        weight_noise = float(((w - q.dequantize().double()) ** 2).sum())
        entry = {"op": "Gather" if isinstance(modules[name], nn.Embedding) else "MatMul",
                 "shape": list(weight.shape), "bytes_before": weight.numel() * 4, "bytes_after": q.nbytes(),
                 "weight_sqnr_db": 10.0 * math.log10(float((w**2).sum()) / weight_noise) if weight_noise > 0 else math.inf}
        if name in grams and grams[name].rows:
            entry["output_sqnr_db"] = _output_sqnr_db(weight, q.dequantize(), grams[name].gram)
        layers[name] = entry
    sqnrs = [e["output_sqnr_db"] for e in layers.values() if math.isfinite(e.get("output_sqnr_db", math.nan))]
    kept_bytes = sum(modules[n].weight.numel() * 4 for n in kept_modules)
    summary = {
        "bits": config.bits,
        "group_size": config.group_size,
        "method": config.method,
        "symmetric": config.symmetric,
        "layers_quantized": len(quantized_modules),
        "kept_float": sorted(kept_modules),
        "weight_bytes_before": sum(modules[n].weight.numel() * 4 for n in target_modules),
        "weight_bytes_after": sum(e["bytes_after"] for e in layers.values()) + kept_bytes,
        "mean_output_sqnr_db": float(np.mean(sqnrs)) if sqnrs else None,
        "calibration_examples": min(config.calibration_size, len(ctx.splits.calibration)),
        "export_max_abs_diff": export_diff,
        "export_tolerance": ctx.export_tolerance,
        "deploy_max_abs_diff": deploy_diff,
        "layers": layers,
        **extra,
    }
    missing = [n for n in modules if n not in set(target_modules)]
    if missing:
        summary["not_in_graph"] = missing  # e.g. unused layers, or weights the exporter folded
    if ragged:
        summary["embeddings_left_float"] = ragged  # width not a multiple of group_size
    if config.method == "gptq":
        uncalibrated = [n for n in linear_names if n not in kept_modules and not grams[n].rows]
        if uncalibrated:
            summary["rtn_instead_of_gptq"] = uncalibrated  # never ran on the calibration data
    new_state = ModelState("onnx", onnx_model=deployed, sparse_params=state.sparse_params, export_max_abs_diff=export_diff)
    return StepResult(new_state, summary)
