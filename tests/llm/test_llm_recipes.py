"""Every causal-LM recipe in recipes/ runs end to end (``shrinkml compress --runtime torch``) on a tiny
Llama directory and writes a model.gguf whose tensors are in the formats the recipe asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tests.test_recipes_dir import LLM_RECIPES

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", sorted(LLM_RECIPES))
def test_llm_recipe_writes_the_formats_it_names(name, tiny_bpe_llama_dir, tiny_texts, tmp_path):
    from shrinkml.cli import main
    from shrinkml.formats.gguf_file import read_gguf
    from shrinkml.recipe import Recipe

    recipe = RECIPES / f"{name}.yaml"
    out = tmp_path / "out"
    code = main(["compress", "--model", str(tiny_bpe_llama_dir), "--data", str(tiny_texts), "--task", "perplexity",
                 "--runtime", "torch", "--recipe", str(recipe), "--out", str(out), "--max-length", "32",
                 "--new-tokens", "2", "--repeats", "10", "--threads", "1", "--max-drop", "1.0", "--drop-type", "relative"])
    assert code in (0, 1)
    report = json.loads((out / "report.json").read_text())
    g = read_gguf(out / "model.gguf")
    step = Recipe.from_yaml(recipe).steps[-1]
    weights = [t for t in g.tensors if len(t.shape) == 2]
    types = {t.name: t.type_name for t in weights}
    if step.bits_per_weight is not None:  # a budget: the mean stored bits stay within it
        bits = 8 * sum(t.nbytes for t in weights) / sum(t.shape[0] * t.shape[1] for t in weights)
        assert bits <= step.bits_per_weight + 1e-6 and set(types.values()) <= set(step.candidate_formats)
    else:
        assert types["token_embd.weight"] == step.embedding_format
        others = {v for k, v in types.items() if k != "token_embd.weight"}
        # promote: the most sensitive tensors in promote_format (on this tiny model, possibly all of them)
        assert others <= {step.format, step.promote_format} if step.promote else others == {step.format}
    assert report["compressed"]["size_bytes"] == (out / "model.gguf").stat().st_size
