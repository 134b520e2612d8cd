"""The search space: built from the registry, narrowed by a YAML file, every range a valid config."""

from __future__ import annotations

import pytest

from shrinkml.errors import InputError
from shrinkml.recipe_search.space import SpaceFile, _param, build_space
from shrinkml.recipe_search.units import parse_duration_s, parse_latency_ms, parse_size
from shrinkml.techniques.base import STAGES, registry


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_declared_range_is_valid_for_its_config(name):
    """Conformance: a technique that joins searches declares a stage and ranges its config accepts
    (each choice, and both ends of a range); a new technique is checked by registering it."""
    technique = registry()[name]
    assert technique.stage in STAGES + (None,)
    for field, spec in technique.search_params().items():
        param = _param(f"{name}__{field}", spec, technique.config_cls, name)  # raises on a bad value
        assert not param.is_fixed
        values = param.choices or (param.low, param.high)
        for value in values:
            technique.config_cls(**{field: value})


class _Loaded:
    def __init__(self, kind="torch", text=None):
        import torch.nn as nn

        self.kind, self.text = kind, text
        self.module = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_the_default_space_for_a_torch_classifier_on_onnxruntime():
    space = build_space(_Loaded(), "onnxruntime")
    assert space.stages["structure"] == ("none", "prune.channels", "prune.magnitude")
    assert space.stages["recovery"] == ("none", "finetune")
    assert "quantize.static" in space.stages["quantize"] and "quantize.bf16" not in space.stages["quantize"]
    assert "finish" not in space.stages  # share.embeddings: no embedding table
    assert "text encoder" in space.skipped["prune.heads"] and "torch" in space.skipped["quantize.bf16"]
    assert "openvino" in space.skipped["quantize.nncf"]
    assert {p.name for p in space.params["prune.channels"]} == {"prune.channels__channel_ratio"}


def test_a_space_file_narrows_fixes_and_widens():
    sf = SpaceFile(exclude=("prune.magnitude",), stages={"quantize": ("quantize.static",)},
                   params={"prune.channels__channel_ratio": {"low": 0.3, "high": 0.6, "step": 0.1},
                           "finetune__epochs": 5, "prune.channels__round_to": {"choices": [4, 8]}})
    space = build_space(_Loaded(), "onnxruntime", sf)
    assert space.stages["structure"] == ("none", "prune.channels")
    assert space.stages["quantize"] == ("quantize.static",)  # no "none": every trial quantizes
    params = {p.name: p for ps in space.params.values() for p in ps}
    assert params["finetune__epochs"].is_fixed and params["finetune__epochs"].fixed == 5
    assert params["prune.channels__channel_ratio"].describe() == "0.3..0.6 step 0.1"
    assert params["prune.channels__round_to"].choices == (4, 8)


@pytest.mark.parametrize("sf, message", [
    (SpaceFile(exclude=("prune.nothing",)), "unknown technique"),
    (SpaceFile(stages={"quantize": ("prune.channels",)}), "is not a quantize step"),
    (SpaceFile(stages={"structure": ("prune.heads",)}), "cannot take this model"),
    (SpaceFile(params={"prune.channels__ratio": 0.5}), "has no field"),
    (SpaceFile(params={"prune.channels__channel_ratio": 1.5}), "cannot take the value 1.5"),
    (SpaceFile(params={"prune.channels__channel_ratio": {"low": 0.6, "high": 0.3}}), "low < high"),
    (SpaceFile(params={"quantize.half__dtype": {"choices": ["int3"]}}), "cannot take the value 'int3'"),
    (SpaceFile(params={"prune.heads__head_ratio": 0.5}), "names no technique of this search space"),
])
def test_a_bad_space_file_is_refused_naming_the_entry(sf, message):
    with pytest.raises(InputError, match=message):
        build_space(_Loaded(), "onnxruntime", sf)


def test_a_space_file_is_read_strictly(tmp_path):
    from shrinkml.recipe_search.space import load_space_file

    path = tmp_path / "space.yaml"
    path.write_text("exclude: [quantize.qat]\nstages:\n  quantize: [quantize.dynamic]\n")
    assert load_space_file(path).exclude == ("quantize.qat",)
    path.write_text("exlude: [quantize.qat]\n")
    with pytest.raises(InputError, match="exlude"):
        load_space_file(path)
    path.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        load_space_file(path)


def test_quantities_as_users_type_them():
    assert parse_size("10MB") == 10_000_000 and parse_size("10MiB") == 10 * 2**20 and parse_size("512") == 512
    assert parse_latency_ms("50ms") == 50 and parse_latency_ms("0.2s") == 200 and parse_latency_ms("500us") == 0.5
    assert parse_duration_s("30m") == 1800 and parse_duration_s("1.5h") == 5400 and parse_duration_s("90") == 90
    for bad in ("ten MB", "10 parsecs", "-5MB", "0"):
        with pytest.raises(InputError, match="--max-size"):
            parse_size(bad)


def test_the_best_trial_is_the_preferred_objective_on_the_feasible_front():
    from types import SimpleNamespace

    from shrinkml.recipe_search.study import choose_best, pareto

    def trial(n, size, latency, metric, feasible=True):
        return SimpleNamespace(number=n, values=[size, latency, metric], state=SimpleNamespace(name="COMPLETE"),
                               user_attrs={"constraints": {"drop": -1.0 if feasible else 1.0}})

    trials = [trial(0, 10, 5, 0.90), trial(1, 5, 9, 0.95), trial(2, 12, 6, 0.89),  # 2 is dominated by 0
              trial(3, 1, 1, 0.99, feasible=False)]
    directions = ["minimize", "minimize", "maximize"]
    assert [t.number for t in pareto(trials[:3], directions)] == [0, 1]
    best, front = choose_best(trials, ("size", "latency", "metric"), "latency")
    assert best.number == 0 and [t.number for t in front] == [0, 1]
    assert choose_best(trials, ("size", "latency", "metric"), "size")[0].number == 1
    assert choose_best(trials[3:], ("size", "latency", "metric"), "size") == (None, [])
