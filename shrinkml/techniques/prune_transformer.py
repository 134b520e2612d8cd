"""``prune.heads``, ``prune.ffn``, ``prune.layers``: structured pruning of BERT-like transformers.

Each step physically removes parts of the encoder, so the model comes out with fewer parameters
and fewer MACs and needs no sparse kernels:

- ``prune.heads`` removes attention heads (rows of query/key/value, columns of the attention output
  projection), the same number in every layer, ranked by the L2 norm of each head's weights.
- ``prune.ffn`` removes intermediate neurons of the feed-forward blocks (rows of
  ``intermediate.dense``, columns of ``output.dense``), the same number in every layer.
- ``prune.layers`` drops whole encoder layers (evenly spaced, the first or the last ones, or a
  given list).

They accept a ``TextEncoder`` (or any module with a Hugging Face ``.transformer``) or the Hugging Face
model itself, whose base model has ``encoder.layer[i].attention.self.{query,key,value}``.

Reloading: after ``prune.ffn`` and ``prune.layers`` the Hugging Face config describes the new
shapes (``intermediate_size``, ``num_hidden_layers``), so ``transformer.save_pretrained(dir)`` then
``AutoModel.from_pretrained(dir)`` (or sentence-transformers) reloads the pruned model.
``prune.heads`` cannot be expressed that way: BERT's config derives the head size from
``hidden_size / num_attention_heads``, and transformers 5 has no ``prune_heads`` any more, so a
head-pruned model runs, trains and exports to ONNX but does not reload with ``from_pretrained``.
The summary says so (``reloadable_with_from_pretrained``); deploy it through ONNX.

>>> config = PruneLayersConfig(keep=3)
>>> result = apply_layers(state, config, ctx)  # doctest: +SKIP
>>> result.summary["layers_after"]  # doctest: +SKIP
3
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import torch
    from torch import nn


class PruneHeadsConfig(StepConfig):
    """Hyperparameters of attention-head pruning."""

    technique: Literal["prune.heads"] = Field(
        "prune.heads", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    head_ratio: float = Field(
        0.25,
        ge=0,
        lt=1,
        json_schema_extra=searchable(0.1, 0.5, step=0.1),
        description="fraction of attention heads removed from each layer (rounded down, the same count in every layer)",
    )
    importance: Literal["l2"] = Field(
        "l2", description="how heads are ranked: L2 norm of the head's query, key, value and output-projection weights"
    )
    keep_min: int = Field(1, ge=1, description="heads always kept in each layer, whatever head_ratio says")


class PruneFFNConfig(StepConfig):
    """Hyperparameters of feed-forward (intermediate neuron) pruning."""

    technique: Literal["prune.ffn"] = Field(
        "prune.ffn", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    neuron_ratio: float = Field(
        0.25,
        ge=0,
        lt=1,
        json_schema_extra=searchable(0.1, 0.7, step=0.1),
        description="fraction of intermediate neurons removed from each layer's feed-forward block"
        " (the count kept is then rounded up to round_to)",
    )
    importance: Literal["l1", "l2"] = Field(
        "l2", description="how neurons are ranked: L1 or L2 norm of their input row and output column together"
    )
    round_to: int | None = Field(
        8, ge=1, description="keep the intermediate size a multiple of this (SIMD-friendly shapes); unset: no rounding"
    )


class PruneLayersConfig(StepConfig):
    """Which encoder layers to keep: ``keep`` (a count, placed by ``strategy``) or ``keep_layers``."""

    technique: Literal["prune.layers"] = Field(
        "prune.layers", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    keep: int | None = Field(None, ge=1, description="number of encoder layers kept (give this or keep_layers)",
                             json_schema_extra=searchable(choices=(2, 3, 4, 5)))
    strategy: Literal["alternate", "first", "last"] = Field(
        "alternate",
        description="where the kept layers sit: evenly spaced always keeping the last (alternate), the first"
        " keep layers, or the last keep layers",
    )
    keep_layers: tuple[int, ...] | None = Field(
        None, description="explicit 0-based indices of the encoder layers kept (instead of keep)"
    )

    @model_validator(mode="after")
    def _one_of_keep(self) -> PruneLayersConfig:
        if (self.keep is None) == (self.keep_layers is None):
            raise ValueError("give exactly one of keep (a count) or keep_layers (indices)")
        if self.keep_layers is not None:
            if not self.keep_layers:
                raise ValueError("keep_layers must name at least one layer")
            if any(i < 0 for i in self.keep_layers) or len(set(self.keep_layers)) != len(self.keep_layers):
                raise ValueError(f"keep_layers must be distinct non-negative indices, got {self.keep_layers}")
        return self


# ---------------------------------------------------------------------------------------------
# finding the encoder


def _encoder_parts(model: nn.Module, where: str) -> tuple[nn.Module, Any, nn.ModuleList]:
    """(base Hugging Face model, its config, its list of encoder layers), or an InputError."""
    from torch import nn

    hf = getattr(model, "transformer", model)
    base = getattr(hf, "base_model", hf)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    config = getattr(base, "config", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and config is not None
    if ok:
        first = layers[0]
        attn = getattr(first, "attention", None)
        ok = all(
            isinstance(getattr(getattr(attn, "self", None), n, None), nn.Linear) for n in ("query", "key", "value")
        ) and all(
            isinstance(getattr(getattr(first, part, None), "dense", None), nn.Linear)
            for part in ("intermediate", "output")
        ) and isinstance(getattr(getattr(attn, "output", None), "dense", None), nn.Linear)
    if not ok:
        children = ", ".join(f"{n}: {type(m).__name__}" for n, m in list(model.named_children())[:6]) or "none"
        raise InputError(
            f"{where} needs a BERT-like transformer",
            where=where,
            expected="a TextEncoder (or module with .transformer) whose Hugging Face model has "
            "encoder.layer[i].attention.self.{query,key,value}, attention.output.dense, "
            "intermediate.dense and output.dense",
            found=f"{type(model).__name__} with children ({children})",
            fix=f"use {where} only on BERT-like text models; use prune.channels for other models",
        )
    return base, config, layers


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    import torch
    from torch import nn

    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.train(like.training)
    return out


def _keep_rows(layer: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    bias = layer.bias[idx] if layer.bias is not None else None
    return _linear(layer.weight[idx], bias, layer)


def _keep_cols(layer: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    return _linear(layer.weight[:, idx], layer.bias, layer)


def _summary(before: int, after: int, **counts: Any) -> dict[str, Any]:
    return {
        **counts,
        "params_before": before,
        "params_after": after,
        "param_reduction": 1 - after / before if before else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# prune.heads


def _head_scores(attn: nn.Module, n_heads: int, head_size: int) -> torch.Tensor:
    import torch

    sa = attn.self
    with torch.no_grad():
        scores = torch.zeros(n_heads)
        for h in range(n_heads):
            rows = slice(h * head_size, (h + 1) * head_size)
            total = 0.0
            for lin in (sa.query, sa.key, sa.value):
                total += float(lin.weight[rows].pow(2).sum())
                if lin.bias is not None:
                    total += float(lin.bias[rows].pow(2).sum())
            total += float(attn.output.dense.weight[:, rows].pow(2).sum())
            scores[h] = math.sqrt(total)
    return scores


def _text_encoder(loaded) -> str | None:
    """A search's check: these steps cut Hugging Face transformer encoders only."""
    return None if loaded.text is not None else "not a Hugging Face text encoder"


@register("prune.heads", PruneHeadsConfig, stage="structure", applies=_text_encoder)
def apply_heads(state: ModelState, config: PruneHeadsConfig, ctx: StepContext) -> StepResult:
    """Remove ``head_ratio`` of the attention heads of every layer (lowest L2 norm first)."""
    import torch

    model = copy.deepcopy(state.torch_model)
    _base, hf_config, layers = _encoder_parts(model, "prune.heads")
    attrs = ("num_attention_heads", "attention_head_size", "all_head_size")
    missing = [a for a in attrs if not hasattr(layers[0].attention.self, a)]
    if missing:
        raise InputError(
            "prune.heads does not know how this attention module splits its heads",
            where="prune.heads",
            expected=f"a BERT self-attention with {', '.join(attrs)}",
            found=f"{type(layers[0].attention.self).__name__} without {', '.join(missing)}",
            fix="use prune.ffn / prune.layers on this model",
        )
    params_before = _count_params(model)
    heads_before = [int(layer.attention.self.num_attention_heads) for layer in layers]
    pruned: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        attn = layer.attention
        sa = attn.self
        n_heads, head_size = int(sa.num_attention_heads), int(sa.attention_head_size)
        n_remove = min(int(config.head_ratio * n_heads + 1e-9), n_heads - config.keep_min)
        if n_remove <= 0:
            continue
        scores = _head_scores(attn, n_heads, head_size)
        removed = sorted(int(h) for h in torch.argsort(scores)[:n_remove])
        kept = [h for h in range(n_heads) if h not in removed]
        idx = torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in kept]).to(sa.query.weight.device)
        with torch.no_grad():
            sa.query, sa.key, sa.value = (_keep_rows(lin, idx) for lin in (sa.query, sa.key, sa.value))
            attn.output.dense = _keep_cols(attn.output.dense, idx)
        # BERT's forward reshapes with attention_head_size (unchanged) and reads the head count from
        # the tensor, so only these two attributes need to follow the new width.
        sa.num_attention_heads = len(kept)
        sa.all_head_size = len(kept) * head_size
        pruned[i] = removed
    heads_after = [int(layer.attention.self.num_attention_heads) for layer in layers]
    summary = _summary(
        params_before,
        _count_params(model),
        head_ratio=config.head_ratio,
        heads_before=sum(heads_before),
        heads_after=sum(heads_after),
        heads_per_layer_after=heads_after,
        pruned_heads={str(k): v for k, v in pruned.items()},
        reloadable_with_from_pretrained=all(
            int(layer.attention.self.all_head_size) == int(hf_config.hidden_size) for layer in layers
        ),
    )
    return StepResult(replace(state, torch_model=model), summary)


# ---------------------------------------------------------------------------------------------
# prune.ffn


@register("prune.ffn", PruneFFNConfig, stage="structure", applies=_text_encoder)
def apply_ffn(state: ModelState, config: PruneFFNConfig, ctx: StepContext) -> StepResult:
    """Remove ``neuron_ratio`` of the feed-forward neurons of every layer (lowest norm first)."""
    import torch

    model = copy.deepcopy(state.torch_model)
    _base, hf_config, layers = _encoder_parts(model, "prune.ffn")
    params_before = _count_params(model)
    sizes = {int(layer.intermediate.dense.out_features) for layer in layers}
    if len(sizes) != 1:
        raise InputError(
            "the layers' feed-forward blocks have different widths",
            where="prune.ffn",
            expected="the same intermediate size in every layer (what the Hugging Face config can express)",
            found=f"intermediate sizes {sorted(sizes)}",
        )
    width = sizes.pop()
    n_keep = width - int(config.neuron_ratio * width + 1e-9)
    if config.round_to:
        n_keep = min(width, math.ceil(n_keep / config.round_to) * config.round_to)
    n_keep = max(n_keep, 1)
    if n_keep < width:
        p = 1 if config.importance == "l1" else 2
        for layer in layers:
            w_in, w_out = layer.intermediate.dense.weight.detach(), layer.output.dense.weight.detach()
            if p == 1:
                scores = w_in.abs().sum(1) + w_out.abs().sum(0)
            else:
                scores = (w_in.pow(2).sum(1) + w_out.pow(2).sum(0)).sqrt()
            idx = torch.sort(torch.argsort(scores, descending=True)[:n_keep]).values
            with torch.no_grad():
                layer.intermediate.dense = _keep_rows(layer.intermediate.dense, idx)
                layer.output.dense = _keep_cols(layer.output.dense, idx)
        hf_config.intermediate_size = n_keep
    summary = _summary(
        params_before,
        _count_params(model),
        neuron_ratio=config.neuron_ratio,
        neurons_per_layer_before=width,
        neurons_per_layer_after=n_keep,
        neurons_before=width * len(layers),
        neurons_after=n_keep * len(layers),
    )
    return StepResult(replace(state, torch_model=model), summary)


# ---------------------------------------------------------------------------------------------
# prune.layers


def layers_kept(n_layers: int, config: PruneLayersConfig) -> list[int]:
    """The 0-based indices of the encoder layers ``config`` keeps out of ``n_layers``."""
    if config.keep_layers is not None:
        bad = [i for i in config.keep_layers if i >= n_layers]
        if bad:
            raise InputError(
                "keep_layers names layers the model does not have",
                where="prune.layers.keep_layers",
                expected=f"indices in 0..{n_layers - 1}",
                found=f"{bad}",
            )
        return sorted(config.keep_layers)
    keep = int(config.keep)  # the validator guarantees one of keep / keep_layers
    if keep > n_layers:
        raise InputError(
            "prune.layers keeps more layers than the model has",
            where="prune.layers.keep",
            expected=f"at most {n_layers}",
            found=f"keep={keep}",
            fix=f"set keep to {n_layers} or fewer",
        )
    if config.strategy == "first":
        return list(range(keep))
    if config.strategy == "last":
        return list(range(n_layers - keep, n_layers))
    # evenly spaced, ending on the last layer: steps of n/keep >= 1 give distinct indices
    return [int(math.floor((i + 1) * n_layers / keep + 0.5)) - 1 for i in range(keep)]


@register("prune.layers", PruneLayersConfig, stage="structure", applies=_text_encoder)
def apply_layers(state: ModelState, config: PruneLayersConfig, ctx: StepContext) -> StepResult:
    """Keep only the chosen encoder layers, in their original order."""
    from torch import nn

    model = copy.deepcopy(state.torch_model)
    base, hf_config, layers = _encoder_parts(model, "prune.layers")
    params_before = _count_params(model)
    n_before = len(layers)
    kept = layers_kept(n_before, config)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_i, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # KV-cache slot of decoder use; keep it consistent
                module.layer_idx = new_i
    base.encoder.layer = new_layers
    hf_config.num_hidden_layers = len(kept)
    for name in ("layer_types",):  # per-layer lists in some configs must follow the layers
        values = getattr(hf_config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n_before:
            setattr(hf_config, name, [values[i] for i in kept])
    summary = _summary(
        params_before,
        _count_params(model),
        layers_before=n_before,
        layers_after=len(kept),
        layers_kept=kept,
    )
    return StepResult(replace(state, torch_model=model), summary)
