"""Conformance of prune.magnitude: config contract, behaviour on small models, measured effect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import shrinkml.techniques.prune_magnitude as pm
from shrinkml.data.arrays import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.progress import SILENT
from shrinkml.techniques.base import ModelState, StepContext, _REGISTRY


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    output_layer: str  # module name of the classifier


CASES = [Case("mlp", mlp, (8, 16), "2"), Case("cnn", cnn, (8, 3, 8, 8), "7")]


def make_ctx(case: Case) -> StepContext:
    x = np.random.default_rng(0).standard_normal(case.input_shape).astype(np.float32)
    data = ArrayData(x, np.zeros(len(x), dtype=np.int64))
    splits = Splits(data, data, data, source="test", seed=0)
    return StepContext(splits, None, None, x, seed=0, threads=1, progress=SILENT, workdir=Path("."))


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def test_registered():
    assert _REGISTRY["prune.magnitude"].apply.__wrapped__ is pm.apply  # wrapped to keep ONNX input metadata
    assert _REGISTRY["prune.magnitude"].config_cls is pm.PruneMagnitudeConfig


def test_config_round_trips():
    config = pm.PruneMagnitudeConfig(sparsity=0.7, scope="layer", layer_types=("conv",), ignore=("fc*",))
    assert pm.PruneMagnitudeConfig.model_validate(config.model_dump()) == config
    assert pm.PruneMagnitudeConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    "bad",
    [{"sparsity": 1.0}, {"sparsity": -0.1}, {"scope": "model"}, {"layer_types": ("attention",)}, {"layer_types": ()},
     {"sparsity_ratio": 0.5}],
)
def test_invalid_values_rejected(bad):
    with pytest.raises(ValidationError):
        pm.PruneMagnitudeConfig(**bad)


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        pm.PruneMagnitudeConfig().sparsity = 0.9


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparsity_reached_and_forward_runs(case, scope, sparsity):
    model = case.build()
    ctx = make_ctx(case)
    result = pm.apply(ModelState("torch", model), pm.PruneMagnitudeConfig(sparsity=sparsity, scope=scope), ctx)
    pruned = result.state.torch_model
    weights = prunable_weights(pruned)
    total = sum(w.numel() for w in weights.values())
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    assert nonzero / total == pytest.approx(1 - sparsity, abs=0.01)
    if scope == "layer":
        for w in weights.values():
            assert float((w == 0).float().mean()) == pytest.approx(sparsity, abs=0.01)
    # biases and norms stay dense
    assert all(bool((m.bias != 0).all()) for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    out = pruned(torch.as_tensor(ctx.example_input))
    assert out.shape == (case.input_shape[0], 4)
    s = result.summary
    assert s["sparsity_target"] == sparsity
    assert s["sparsity_achieved"] == pytest.approx(1 - nonzero / total)
    assert s["pruned_params"] == total and s["zeroed"] == total - nonzero
    assert s["layers"] == len(weights)
    assert result.state.sparse_params == frozenset(weights)


def test_global_scope_prunes_small_weights_across_layers(case):
    model = case.build()
    with torch.no_grad():  # make one layer's weights tiny: a global threshold empties it first
        prunable_weights(model)[f"{case.output_layer}.weight"].mul_(1e-3)
    result = pm.apply(ModelState("torch", model), pm.PruneMagnitudeConfig(sparsity=0.25), make_ctx(case))
    head = prunable_weights(result.state.torch_model)[f"{case.output_layer}.weight"]
    assert bool((head == 0).all())


def test_input_model_not_mutated(case):
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = ModelState("torch", model, sparse_params=frozenset({"earlier.weight"}))
    result = pm.apply(state, pm.PruneMagnitudeConfig(sparsity=0.8), make_ctx(case))
    assert result.state.torch_model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "earlier.weight" in result.state.sparse_params  # previous sparse set is kept
    assert state.sparse_params == frozenset({"earlier.weight"})


def test_ignore_patterns_respected(case):
    model = case.build()
    original = model.state_dict()[f"{case.output_layer}.weight"].clone()
    config = pm.PruneMagnitudeConfig(sparsity=0.8, ignore=(case.output_layer,))
    result = pm.apply(ModelState("torch", model), config, make_ctx(case))
    assert torch.equal(result.state.torch_model.state_dict()[f"{case.output_layer}.weight"], original)
    assert f"{case.output_layer}.weight" not in result.state.sparse_params
    assert result.summary["layers"] == len(prunable_weights(model)) - 1


def test_layer_types_select_layers():
    case = CASES[1]
    result = pm.apply(ModelState("torch", cnn()), pm.PruneMagnitudeConfig(layer_types=("conv",)), make_ctx(case))
    assert result.state.sparse_params == frozenset({"0.weight", "3.weight"})
    assert bool((result.state.torch_model[7].weight != 0).all())


def test_nothing_to_prune_is_an_input_error():
    with pytest.raises(InputError, match="no layer to prune"):
        pm.apply(ModelState("torch", mlp()), pm.PruneMagnitudeConfig(layer_types=("conv",)), make_ctx(CASES[0]))
