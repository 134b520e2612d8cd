from __future__ import annotations

import pytest
import yaml

from shrinkml.errors import InputError
from shrinkml.recipe import Recipe, as_recipe
from shrinkml.techniques.prune_channels import PruneChannelsConfig


def test_yaml_round_trip_fills_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - technique: prune.channels\n    channel_ratio: 0.25\n  - technique: finetune\n  - technique: quantize.dynamic\n")
    recipe = Recipe.from_yaml(path)
    resolved = recipe.to_dict()
    assert resolved["steps"][0]["channel_ratio"] == 0.25
    assert resolved["steps"][1]["epochs"] == 3  # default filled in
    (tmp_path / "resolved.yaml").write_text(recipe.to_yaml())
    again = Recipe.from_yaml(tmp_path / "resolved.yaml")
    assert again == recipe
    assert again.to_dict() == resolved


def test_python_configs_and_dicts_mix():
    recipe = as_recipe([PruneChannelsConfig(channel_ratio=0.3), {"technique": "quantize.dynamic"}])
    assert [s.technique for s in recipe.steps] == ["prune.channels", "quantize.dynamic"]
    assert recipe.steps[0].channel_ratio == 0.3


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"technique": "prune.magnitude", "sparsity": 1.2}], "steps[0].sparsity: must be in [0, 1), got 1.2"),
        ([{"technique": "quantize.dynamic"}, {"technique": "prune.channels", "chanel_ratio": 0.5}], "steps[1].chanel_ratio: unknown key"),
        ([{"technique": "prune.everything"}], "steps[0].technique: unknown technique"),
        ([{"channel_ratio": 0.5}], "missing 'technique'"),
        ([{"technique": "finetune", "epochs": "many"}], "steps[0].epochs"),
        ([], "no steps"),
        (["prune.channels"], "steps[0]: a step must be a mapping"),
    ],
)
def test_invalid_recipes_name_the_field(steps, message):
    with pytest.raises(InputError) as err:
        Recipe.from_steps(steps)
    assert message in str(err.value)
    assert "Fix:" in str(err.value) or "no steps" in str(err.value) or "Expected" in str(err.value)


def test_unknown_top_level_key_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="unknown top-level key"):
        Recipe.from_dict({"steps": [{"technique": "finetune"}], "stpes": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        Recipe.from_yaml(bad)
    with pytest.raises(InputError, match="not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("steps: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        Recipe.from_yaml(evil)


def test_torch_step_after_onnx_step_is_rejected():
    recipe = Recipe.from_steps([{"technique": "quantize.dynamic"}, {"technique": "finetune"}])
    with pytest.raises(InputError, match=r"steps\[1\]: finetune needs a PyTorch model"):
        recipe.check_model_kind("torch")
    with pytest.raises(InputError, match=r"steps\[0\]"):
        Recipe.from_steps([{"technique": "prune.channels"}]).check_model_kind("onnx")
    Recipe.from_steps([{"technique": "quantize.dynamic"}]).check_model_kind("onnx")


def test_resolved_recipe_is_plain_yaml():
    recipe = Recipe.from_steps([{"technique": "quantize.dynamic"}])
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()
