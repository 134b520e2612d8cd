"""``prune.magnitude``: unstructured magnitude pruning (exact zeros in Linear / Conv weights).

The zeros do not make a dense model smaller or faster on their own: they pay off only once an
encoder stores them sparsely (``shrinkml.models.safetensors_io``, ``shrinkml.runtimes.onnx_sparse``)
and the measurement step finds the artifact on disk smaller. This step only sets the zeros and
records which parameters carry them (``ModelState.sparse_params``) so later training keeps them.

>>> config = PruneMagnitudeConfig(sparsity=0.8, ignore=("classifier*",))
>>> result = apply(state, config, ctx)  # doctest: +SKIP
>>> result.summary["sparsity_achieved"]  # doctest: +SKIP
0.8
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import torch
    from torch import nn

LayerType = Literal["linear", "conv"]


def _layer_classes() -> dict[str, tuple[type[nn.Module], ...]]:
    """The module classes of each layer type (a function, so importing this module imports no torch)."""
    from torch import nn

    return {
        "linear": (nn.Linear,),
        "conv": (nn.modules.conv._ConvNd,),  # Conv1d/2d/3d and their transposed forms
    }


class PruneMagnitudeConfig(StepConfig):
    """Hyperparameters of unstructured magnitude pruning."""

    technique: Literal["prune.magnitude"] = Field(
        "prune.magnitude", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    sparsity: float = Field(
        0.5, ge=0, lt=1, json_schema_extra=searchable(0.3, 0.9, step=0.1), description="fraction of the pruned layers' weights set to zero (weights only, not biases)"
    )
    scope: Literal["global", "layer"] = Field(
        "global",
        description="global: one magnitude threshold across all pruned weights (layers end with different"
        " sparsities); layer: the same fraction zeroed in each layer",
    )
    layer_types: tuple[LayerType, ...] = Field(
        ("linear", "conv"), min_length=1, description="layer kinds pruned: linear (nn.Linear) and/or conv (nn.ConvNd)"
    )
    ignore: tuple[str, ...] = Field(
        (), description="module-name globs (e.g. 'classifier', 'encoder.0'; a module and everything inside it) left dense"
    )


def _prunable_weights(model: nn.Module, config: PruneMagnitudeConfig) -> dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of the layers this config prunes, each tensor once."""
    from torch import nn

    from shrinkml.layers import matches, select

    layer_classes = _layer_classes()
    classes = tuple(cls for kind in config.layer_types for cls in layer_classes[kind])
    seen: set[int] = set()
    weights: dict[str, nn.Parameter] = {}
    select([n for n, _ in model.named_modules() if n], config.ignore, where="prune.magnitude.ignore")  # each must match
    for name, module in model.named_modules():
        if not isinstance(module, classes) or matches(name, config.ignore):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
            continue
        if id(weight) in seen:  # tied weights: prune the shared tensor once
            continue
        seen.add(id(weight))
        weights[f"{name}.weight" if name else "weight"] = weight
    return weights


def _zero_mask(magnitudes: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Boolean mask of exactly ``n_zero`` smallest entries (ties broken by position, stable)."""
    import torch

    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    if n_zero > 0:
        order = torch.argsort(magnitudes.reshape(-1), stable=True)
        mask[order[:n_zero]] = True
    return mask


@register("prune.magnitude", PruneMagnitudeConfig, stage="structure")
def apply(state: ModelState, config: PruneMagnitudeConfig, ctx: StepContext) -> StepResult:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights; the input state is untouched."""
    import torch

    model = copy.deepcopy(state.torch_model)
    weights = _prunable_weights(model, config)
    if not weights:
        raise InputError(
            "prune.magnitude found no layer to prune",
            where="prune.magnitude",
            expected=f"at least one {' or '.join(config.layer_types)} layer not matched by ignore",
            found=f"layer_types={list(config.layer_types)}, ignore={list(config.ignore)}",
            fix="widen layer_types or narrow the ignore patterns",
        )

    with torch.no_grad():
        magnitudes = {name: w.detach().abs().float().cpu().reshape(-1) for name, w in weights.items()}
        if config.scope == "global":
            flat = torch.cat(list(magnitudes.values()))
            mask = _zero_mask(flat, round(config.sparsity * flat.numel()))
            masks = dict(zip(magnitudes, torch.split(mask, [m.numel() for m in magnitudes.values()])))
        else:
            masks = {name: _zero_mask(m, round(config.sparsity * m.numel())) for name, m in magnitudes.items()}
        for name, weight in weights.items():
            weight.masked_fill_(masks[name].view(weight.shape).to(weight.device), 0)
        total = sum(w.numel() for w in weights.values())
        zeros = sum(int((w == 0).sum()) for w in weights.values())

    new_state = replace(state, torch_model=model, sparse_params=state.sparse_params | frozenset(weights))
    summary = {
        "sparsity_target": config.sparsity,
        "sparsity_achieved": zeros / total,
        "pruned_params": total,  # weight elements in the pruned layers
        "zeroed": zeros,  # of those, how many are zero now
        "layers": len(weights),
    }
    return StepResult(new_state, summary)
