"""The shipped recipes in recipes/: every file validates, and the ones for ordinary models (CNN, MLP)
run end to end on a tiny model of their kind and make its file smaller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import shrinkml
from shrinkml.api import Budget, RunSettings
from shrinkml.data import make_splits
from shrinkml.recipe import Recipe
from shrinkml.report import REPORT_SCHEMA, validate_report
from tests.conftest import tiny_cnn, tiny_mlp, toy_data

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
TEXT_RECIPES = {"minilm-fast", "minilm-small"}  # need a text encoder: covered by tests/test_text.py
# need a causal LM: each runs end to end on a tiny Llama in tests/llm/test_llm_recipes.py
LLM_RECIPES = {"llm-q4_0", "llm-q4_0-gptq", "llm-q4_0-imatrix", "llm-q4_0-mixed", "llm-mixed-5.34bpw", "llm-q8_0",
               "llm-q8_0-gptq"}
MODELS = {"cnn-fast": tiny_cnn, "cnn-small": tiny_cnn, "mlp": tiny_mlp}
FAST = RunSettings(repeats=10, warmup=1, batch_n=8, threads=1, bootstrap_resamples=500, measure_memory=False)


def test_every_recipe_is_tested_on_a_model():
    assert RECIPES, "recipes/ holds no .yaml files"
    assert {p.stem for p in RECIPES} - TEXT_RECIPES - LLM_RECIPES == set(MODELS), (
        "add a new recipe to MODELS, TEXT_RECIPES or LLM_RECIPES")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_round_trips(path):
    recipe = Recipe.from_yaml(path)
    recipe.check_model_kind("torch")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert path.read_text(encoding="utf-8").startswith("#"), "start the recipe with a comment saying what it is for"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recipe_runs_end_to_end_and_shrinks_the_file(name, tmp_path):
    recipe = Recipe.from_yaml(RECIPES[[p.stem for p in RECIPES].index(name)])
    splits = make_splits(toy_data(300), seed=0)
    out = tmp_path / "out"
    result = shrinkml.compress(
        MODELS[name](), recipe, data=splits, out=out, settings=FAST, budget=Budget(max_drop=1.0)
    )
    report = result.report
    validate_report(report)
    assert json.loads((out / "report.json").read_text())["schema"] == REPORT_SCHEMA
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert [step["technique"] for step in report["recipe"]["steps"]] == [s.technique for s in recipe.steps]
    baseline, compressed = report["baseline"], report["compressed"]
    assert compressed["size_bytes"] == (out / "model.onnx").stat().st_size
    assert compressed["size_bytes"] < baseline["size_bytes"]
    assert compressed["params"] < baseline["params"]  # prune.channels really removed channels
    assert report["delta"]["size_ratio"] > 1
