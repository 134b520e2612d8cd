"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before INT8.

Transformer activations have a few channels whose values are 10-100x larger than the rest, so a
per-tensor INT8 activation scale wastes most of its levels on them. For a LayerNorm whose output
feeds Linear layers, ``LN(x) @ W.T == (LN(x) / s) @ (W * s).T`` for any per-channel ``s > 0``;
dividing the LayerNorm's affine weight and bias by ``s`` and multiplying the Linears' input
columns by ``s`` changes nothing in float, and with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
it flattens the activation's channel maxima (``alpha`` = how much of the difficulty moves to the
weights).

The LayerNorm -> Linear groups are found by tracing: a Linear whose input tensor *is* a
LayerNorm's output tensor (the same object, not a copy or a reshape). Because hooks cannot see
other consumers of that tensor (a residual add after a post-LN block, say), each group is checked
on the calibration data and kept only if the model's output is unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shrinkml.errors import InputError

BATCH_SIZE = 64
# Smoothing is exact in real arithmetic; in float32 it changes outputs by rounding only. A group
# that changes the output by more than this (relative to its largest value) has another consumer.
EQUIVALENCE_RTOL = 1e-3
MIN_SCALE = 1e-5


@dataclass
class _Group:
    layernorm: str
    linears: list[str]
    act_max: torch.Tensor | None = None  # per input channel, over all calibration data
    stats: dict = field(default_factory=dict)


def _batches(x: torch.Tensor):
    for start in range(0, len(x), BATCH_SIZE):
        yield x[start : start + BATCH_SIZE]


def _find_groups(model: nn.Module, x: torch.Tensor) -> list[_Group]:
    """LayerNorm -> Linear edges seen while running one batch."""
    layernorms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ln_outputs: list[tuple[str, torch.Tensor]] = []  # tensors kept alive, so `is` is meaningful
    linear_inputs: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: ln_outputs.append((name, out)))
        for name, m in layernorms.items()
    ] + [
        m.register_forward_pre_hook(lambda _m, args, name=name: linear_inputs.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    edges: dict[str, list[str]] = {}
    for linear_name, tensor in linear_inputs:
        for ln_name, out in ln_outputs:
            if tensor is out and linear_name not in edges.get(ln_name, []):
                edges.setdefault(ln_name, []).append(linear_name)
    groups = []
    for ln_name, linear_names in edges.items():
        ln = layernorms[ln_name]
        if ln.weight is None or len(ln.normalized_shape) != 1:
            continue  # nothing to fold the scale into, or not a per-channel (last-axis) norm
        if all(linears[n].in_features == ln.normalized_shape[0] for n in linear_names):
            groups.append(_Group(ln_name, linear_names))
    return groups


def _activation_max(model: nn.Module, groups: list[_Group], x: torch.Tensor) -> None:
    modules = dict(model.named_modules())

    def hook(group: _Group):
        def record(_m, _i, out):
            amax = out.detach().abs().reshape(-1, out.shape[-1]).amax(dim=0).float()
            group.act_max = amax if group.act_max is None else torch.maximum(group.act_max, amax)

        return record

    handles = [modules[g.layernorm].register_forward_hook(hook(g)) for g in groups]
    try:
        with torch.no_grad():
            for batch in _batches(x):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()


def _outlier_ratio(channel_max: torch.Tensor) -> float:
    """max / median of per-channel maxima: 1 for flat activations, large with outlier channels."""
    median = float(channel_max.median())
    return float(channel_max.max()) / median if median > 0 else float("inf")


def _smooth(modules: dict[str, nn.Module], group: _Group, alpha: float) -> torch.Tensor:
    ln = modules[group.layernorm]
    weights = [modules[n].weight for n in group.linears]
    w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    act_max = group.act_max.to(w_max.device)
    scale = (act_max.pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
    with torch.no_grad():
        ln.weight.div_(scale.to(ln.weight.dtype))
        if ln.bias is not None:
            ln.bias.div_(scale.to(ln.bias.dtype))
        for w in weights:
            w.mul_(scale.to(w.dtype))
    return scale


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(model(batch)) for batch in _batches(x)])


def smooth_linears(
    model: nn.Module, calibration_x: np.ndarray | torch.Tensor, *, alpha: float
) -> tuple[nn.Module, dict]:
    """A smoothed deep copy of ``model`` (the original is untouched) and a summary.

    >>> smoothed, summary = smooth_linears(model, calib_x, alpha=0.5)  # doctest: +SKIP
    >>> summary["smoothed_groups"], summary["groups"][0]["outlier_ratio_after"]  # doctest: +SKIP
    (12, 3.1)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], found {alpha}")
    x = torch.as_tensor(calibration_x)
    if len(x) == 0:
        raise InputError("smoothquant needs calibration data", where="smoothquant", found="0 examples",
                         fix="give calibration examples")
    smoothed = copy.deepcopy(model).eval()
    groups = _find_groups(smoothed, x[:BATCH_SIZE])
    if not groups:
        raise InputError(
            "smoothquant found no LayerNorm whose output feeds a Linear layer",
            where="quantize.static.smoothquant",
            expected="a transformer-style model (LayerNorm -> Linear, e.g. attention q/k/v or MLP input)",
            found=f"{sum(isinstance(m, nn.LayerNorm) for m in model.modules())} LayerNorm and "
            f"{sum(isinstance(m, nn.Linear) for m in model.modules())} Linear modules, none connected",
            fix="set smoothquant: false; smoothquant applies to transformer linears",
        )
    _activation_max(smoothed, groups, x)
    modules = dict(smoothed.named_modules())
    reference = _outputs(smoothed, x)
    tolerance = EQUIVALENCE_RTOL * float(reference.abs().max()) + 1e-6
    kept, skipped = [], []
    for group in groups:
        saved = {n: modules[n].weight.detach().clone() for n in group.linears}
        ln = modules[group.layernorm]
        ln_saved = (ln.weight.detach().clone(), None if ln.bias is None else ln.bias.detach().clone())
        scale = _smooth(modules, group, alpha)
        if float((_outputs(smoothed, x) - reference).abs().max()) > tolerance:
            with torch.no_grad():  # another consumer sees the LayerNorm output: undo
                for n, w in saved.items():
                    modules[n].weight.copy_(w)
                ln.weight.copy_(ln_saved[0])
                if ln.bias is not None:
                    ln.bias.copy_(ln_saved[1])
            skipped.append({"layernorm": group.layernorm, "reason": "its output has consumers besides the Linears"})
            continue
        kept.append(
            {
                "layernorm": group.layernorm,
                "linears": group.linears,
                "outlier_ratio_before": _outlier_ratio(group.act_max),
                "outlier_ratio_after": _outlier_ratio(group.act_max / scale),
            }
        )
    if not kept:
        raise InputError(
            "smoothquant found LayerNorm -> Linear groups but none can be smoothed without changing the output",
            where="quantize.static.smoothquant",
            expected="LayerNorm outputs used only by Linear layers (pre-LN transformer blocks)",
            found="LayerNorms " + ", ".join(s["layernorm"] for s in skipped[:10]) + " also feed other operations",
            fix="set smoothquant: false",
        )
    summary = {"smoothed_groups": len(kept), "alpha": alpha, "groups": kept, "skipped": skipped}
    return smoothed, summary
