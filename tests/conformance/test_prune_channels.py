"""Conformance of prune.channels: config contract, physically smaller layers, output layer kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import shrinkml.techniques.prune_channels as pc
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


class HeadDeclaredFirst(nn.Module):
    """The classifier is declared before the body: only forward order tells which is the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(32, 4)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


class HardCodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(-1, 16 * 8 * 8))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    output_layer: str  # module name of the classifier


CASES = [Case("mlp", mlp, (8, 16), "2"), Case("cnn", cnn, (8, 3, 8, 8), "7")]


def make_ctx(case: Case, seed: int = 0) -> StepContext:
    x = np.random.default_rng(0).standard_normal(case.input_shape).astype(np.float32)
    data = ArrayData(x, np.zeros(len(x), dtype=np.int64))
    splits = Splits(data, data, data, source="test", seed=0)
    return StepContext(splits, None, None, x, seed=seed, threads=1, progress=SILENT, workdir=Path("."))


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def test_registered():
    assert _REGISTRY["prune.channels"].apply.__wrapped__ is pc.apply  # wrapped to keep ONNX input metadata
    assert _REGISTRY["prune.channels"].config_cls is pc.PruneChannelsConfig


def test_config_round_trips():
    config = pc.PruneChannelsConfig(
        channel_ratio=0.3, importance="l1", global_pruning=True, ignore=("a.*",), round_to=8
    )
    assert pc.PruneChannelsConfig.model_validate(config.model_dump()) == config
    assert pc.PruneChannelsConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    "bad",
    [{"channel_ratio": 1.2}, {"channel_ratio": 1.0}, {"channel_ratio": -0.1}, {"importance": "l3"},
     {"round_to": 0}, {"pruning_ratio": 0.5}],
)
def test_invalid_values_rejected(bad):
    with pytest.raises(ValidationError):
        pc.PruneChannelsConfig(**bad)


@pytest.mark.parametrize("importance", ["l1", "l2", "random"])
def test_layers_shrink_and_output_layer_kept(case, importance):
    model = case.build()
    ctx = make_ctx(case)
    result = pc.apply(ModelState("torch", model), pc.PruneChannelsConfig(channel_ratio=0.5, importance=importance), ctx)
    pruned = result.state.torch_model
    before, after = layers(model), layers(pruned)
    for name in before:
        if name == case.output_layer:
            assert out_channels(after[name]) == out_channels(before[name])
        else:
            assert out_channels(after[name]) == out_channels(before[name]) // 2
    out = pruned(torch.as_tensor(ctx.example_input))
    assert out.shape == (case.input_shape[0], 4)

    s = result.summary
    prunable = [n for n in before if n != case.output_layer]
    assert s["channel_ratio"] == 0.5
    assert s["channels_before"] == sum(out_channels(before[n]) for n in prunable)
    assert s["channels_after"] == sum(out_channels(after[n]) for n in prunable)
    assert s["params_before"] == n_params(model) and s["params_after"] == n_params(pruned)
    assert s["params_after"] < s["params_before"]
    assert s["param_reduction"] == pytest.approx(1 - n_params(pruned) / n_params(model))


def test_cnn_parameter_reduction_exceeds_channel_ratio():
    # Consecutive convs both lose half their channels: weights between them drop by ~3/4.
    result = pc.apply(ModelState("torch", cnn()), pc.PruneChannelsConfig(channel_ratio=0.5), make_ctx(CASES[1]))
    assert result.summary["param_reduction"] > 0.6


def test_input_model_not_mutated(case):
    model = case.build().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pc.apply(ModelState("torch", model), pc.PruneChannelsConfig(), make_ctx(case))
    assert result.state.torch_model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.state.torch_model.training  # mode kept; tracing did not run in train mode
    assert result.state.torch_model.state_dict().keys() == model.state_dict().keys()


def test_sparse_params_kept(case):
    state = ModelState("torch", case.build(), sparse_params=frozenset({"0.weight"}))
    assert pc.apply(state, pc.PruneChannelsConfig(), make_ctx(case)).state.sparse_params == state.sparse_params


def test_ignore_patterns_respected():
    model = cnn()
    result = pc.apply(ModelState("torch", model), pc.PruneChannelsConfig(ignore=("0",)), make_ctx(CASES[1]))
    pruned = result.state.torch_model
    assert pruned[0].out_channels == 16 and pruned[1].num_features == 16
    assert torch.equal(pruned[0].weight, model[0].weight)
    assert pruned[3].out_channels == 16


def test_output_layer_found_by_forward_order():
    case = Case("head-first", HeadDeclaredFirst, (8, 16), "head")
    result = pc.apply(ModelState("torch", HeadDeclaredFirst()), pc.PruneChannelsConfig(), make_ctx(case))
    pruned = result.state.torch_model
    assert pruned.head.out_features == 4
    assert pruned.body[0].out_features == 16 and pruned.body[2].out_features == 16


def test_round_to_keeps_multiples():
    config = pc.PruneChannelsConfig(channel_ratio=0.3, round_to=8)
    result = pc.apply(ModelState("torch", mlp()), config, make_ctx(CASES[0]))
    assert result.state.torch_model[0].out_features % 8 == 0
    assert result.state.torch_model[0].out_features < 64


def test_random_importance_is_seeded():
    def kept(seed: int) -> torch.Tensor:
        config = pc.PruneChannelsConfig(importance="random")
        return pc.apply(ModelState("torch", mlp()), config, make_ctx(CASES[0], seed)).state.torch_model[0].weight

    assert torch.equal(kept(1), kept(1))
    assert not torch.equal(kept(1), kept(2))


def test_global_pruning_runs():
    result = pc.apply(ModelState("torch", cnn()), pc.PruneChannelsConfig(global_pruning=True), make_ctx(CASES[1]))
    assert result.summary["channels_after"] < result.summary["channels_before"]


def test_zero_ratio_changes_nothing(case):
    model = case.build()
    result = pc.apply(ModelState("torch", model), pc.PruneChannelsConfig(channel_ratio=0.0), make_ctx(case))
    assert result.summary["params_after"] == result.summary["params_before"]


def test_hard_coded_shapes_are_an_input_error_naming_the_layer():
    case = Case("view", HardCodedView, (2, 3, 8, 8), "fc")
    with pytest.raises(InputError, match="ignore: \\['conv'\\]"):
        pc.apply(ModelState("torch", HardCodedView()), pc.PruneChannelsConfig(), make_ctx(case))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.classes = nn.Linear(32, 4)
        self.boxes = nn.Linear(32, 2)

    def forward(self, x):
        h = self.body(x)
        return self.classes(h), self.boxes(h)


def test_every_output_head_is_kept():
    case = Case("two-heads", TwoHeads, (8, 16), "boxes")
    pruned = pc.apply(ModelState("torch", TwoHeads()), pc.PruneChannelsConfig(), make_ctx(case)).state.torch_model
    assert (pruned.classes.out_features, pruned.boxes.out_features) == (4, 2)
    assert pruned.body[0].out_features == 16


def test_torch_pruning_failure_is_an_input_error(monkeypatch):
    import torch_pruning as tp

    def failing_pruner(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::weird")

    monkeypatch.setattr(tp.pruner, "MetaPruner", failing_pruner)
    with pytest.raises(InputError, match="aten::weird") as info:
        pc.apply(ModelState("torch", mlp()), pc.PruneChannelsConfig(), make_ctx(CASES[0]))
    assert "ignore" in info.value.fix


def test_every_config_field_is_described():
    undescribed = [n for n, f in pc.PruneChannelsConfig.model_fields.items() if not f.description]
    assert undescribed == []


def _pruner_raising(monkeypatch, exc: BaseException) -> None:
    import torch_pruning as tp

    def pruner(*args, **kwargs):
        raise exc

    monkeypatch.setattr(tp.pruner, "MetaPruner", pruner)


@pytest.mark.parametrize(
    "exc",
    [AssertionError("dependency graph inconsistent"), NotImplementedError("layer type Foo"),
     ValueError("unsupported op"), KeyError("grad_fn"), IndexError("out of range")],
    ids=lambda e: type(e).__name__,
)
def test_tracing_failures_are_input_errors(monkeypatch, exc):
    _pruner_raising(monkeypatch, exc)
    with pytest.raises(InputError, match=type(exc).__name__) as info:
        pc.apply(ModelState("torch", mlp()), pc.PruneChannelsConfig(), make_ctx(CASES[0]))
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), SystemExit(3), TimeoutError("harness timeout"), MemoryError()],
    ids=lambda e: type(e).__name__,
)
def test_interruptions_are_not_blamed_on_the_model(monkeypatch, exc):
    _pruner_raising(monkeypatch, exc)
    with pytest.raises(type(exc)):
        pc.apply(ModelState("torch", mlp()), pc.PruneChannelsConfig(), make_ctx(CASES[0]))


class TimesOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        raise TimeoutError("harness timeout")


def test_a_timeout_in_the_forward_is_not_an_input_error():
    with pytest.raises(TimeoutError):
        pc.apply(ModelState("torch", TimesOut()), pc.PruneChannelsConfig(), make_ctx(CASES[0]))
