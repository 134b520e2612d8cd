"""Conformance of quantize.bf16: INT8 codes really stored (the safetensors file shrinks by what they
weigh), bfloat16 weights rebuilt from the codes on load, float32 in and out, outputs stay close,
and the step only runs where its output can be measured (PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.examples.bert import bert_encoder
from shrinkml.measure.params import torch_param_counts
from shrinkml.models.safetensors_io import load_state_dict, save_state_dict
from shrinkml.techniques.base import ModelState, get_technique
from shrinkml.techniques.quantize_bf16 import (
    Int8Embedding,
    Int8Linear,
    QuantizeBf16Config,
    apply,
    dequantized_copy,
)
from tests.conftest import make_ctx, tiny_mlp


def setup(tmp_path):
    model = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128)
    ids = np.random.default_rng(0).integers(0, 300, (60, 16)).astype(np.int64)
    return model, make_ctx(model, tmp_path, task="fidelity", data=ArrayData(ids))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def test_config_and_registration():
    technique = get_technique("quantize.bf16")
    assert technique.runtime == "torch" and technique.produces == "torch"
    with pytest.raises(ValidationError):
        QuantizeBf16Config(weights="int4")


def test_int8_codes_are_stored_and_the_model_stays_close(tmp_path):
    model, ctx = setup(tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx)
    q = out.state.torch_model
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    embeddings = [m for m in q.modules() if isinstance(m, Int8Embedding)]
    assert len(linears) == 2 * 6 and len(embeddings) == 2 and out.summary["int8_layers"] == 14
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    sd = q.state_dict()
    assert all(sd[k].dtype == torch.int8 for k in sd if k.endswith("weight_int8"))
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] + ".weight_int8" in sd for k in sd)
    x = torch.as_tensor(ctx.splits.test.x[:8])
    with torch.inference_mode():
        ref, got = model(x), q(x)
    assert got.dtype == torch.float32 and cosine(ref, got) > 0.995
    # parameter counts include the INT8 codes (they are weights, held as buffers)
    assert torch_param_counts(q)[0] == pytest.approx(torch_param_counts(model)[0], rel=0.01)

    # the file holds ~1 byte per quantized weight instead of 4
    f32, i8 = tmp_path / "f32.safetensors", tmp_path / "int8.safetensors"
    save_state_dict(model.state_dict(), f32)
    save_state_dict(sd, i8)
    assert i8.stat().st_size < 0.3 * f32.stat().st_size


def test_weights_are_rebuilt_from_the_codes_on_load(tmp_path):
    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    path = tmp_path / "q.safetensors"
    save_state_dict(q.state_dict(), path)
    fresh = apply(ModelState("torch", torch_model=bert_encoder(hidden=64, layers=2, heads=4, vocab=300,
                                                                 intermediate=128, seed=7)),
                  QuantizeBf16Config(), ctx).state.torch_model
    x = torch.as_tensor(ctx.splits.test.x[:4])
    with torch.inference_mode():
        assert not torch.equal(fresh(x), q(x))
        fresh.load_state_dict(load_state_dict(path))
        assert torch.equal(fresh(x), q(x))


def test_load_int8_rebuilds_the_model_from_the_file(tmp_path):
    from shrinkml.techniques.quantize_bf16 import load_int8

    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(keep_float=("embeddings.position",)),
              ctx).state.torch_model
    path = tmp_path / "q.safetensors"
    save_state_dict(q.state_dict(), path)
    other = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128, seed=3)
    loaded = load_int8(other, str(path))
    x = torch.as_tensor(ctx.splits.test.x[:4])
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    assert isinstance(loaded.embeddings.position, torch.nn.Embedding)


def test_dequantized_copy_is_plain_modules_computing_the_same(tmp_path):
    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    plain = dequantized_copy(q)
    assert not any(isinstance(m, Int8Linear | Int8Embedding) for m in plain.modules())
    x = torch.as_tensor(ctx.splits.test.x[:4])
    with torch.inference_mode():
        assert torch.equal(plain(x), q(x))


def test_bfloat16_weights_and_keep_float(tmp_path):
    model, ctx = setup(tmp_path)
    out = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(weights="bfloat16"), ctx)
    assert out.summary["int8_layers"] == 0
    assert {p.dtype for p in out.state.torch_model.parameters()} == {torch.bfloat16}
    kept = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(keep_float=("embeddings.*",)), ctx)
    assert kept.summary["int8_layers"] == 12 and "embeddings.word" in kept.summary["kept_bfloat16"]


def test_float_inputs_are_cast_and_outputs_are_float32(tmp_path):
    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    x = torch.as_tensor(ctx.splits.test.x[:16])
    with torch.inference_mode():
        got, ref = q(x), model(x)
    assert got.dtype == torch.float32 and cosine(ref, got) > 0.99


def test_errors_name_the_field(tmp_path):
    model, ctx = setup(tmp_path)
    with pytest.raises(InputError, match="no layer matches 'nope'"):
        apply(ModelState("torch", torch_model=model), QuantizeBf16Config(keep_float=("nope",)), ctx)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    with pytest.raises(InputError, match="needs a float32 model"):
        apply(ModelState("torch", torch_model=q), QuantizeBf16Config(), ctx)


def test_compress_refuses_onnxruntime_with_the_fix(tmp_path):
    import shrinkml
    from tests.conftest import toy_data

    with pytest.raises(InputError, match="only torch can run") as info:
        shrinkml.compress(tiny_mlp(), [{"technique": "quantize.bf16"}], data=toy_data(100))
    assert "--runtime torch" in str(info.value)


def test_it_must_be_the_last_step():
    from shrinkml.recipe import Recipe

    recipe = Recipe.from_steps([{"technique": "quantize.bf16"}, {"technique": "prune.magnitude"}])
    with pytest.raises(InputError, match="comes after quantize.bf16") as info:
        recipe.check_model_kind("torch")
    assert info.value.where == "steps[1]" and "last step" in str(info.value)


# --- the file is self-contained: loaded in a fresh process from the file alone -------------------

# loads each (file, ids, out) triple with only the file; a factory model's architecture comes from
# the factory's code (shrinkml.examples.bert), never from weights
_LOAD_ALONE = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from shrinkml.techniques.quantize_bf16 import load_int8
args = sys.argv[1:]
for file, ids, out in zip(args[0::3], args[1::3], args[2::3]):
    if file.startswith("factory:"):
        from shrinkml.examples.bert import bert_encoder
        model = load_int8(file[len("factory:"):], model=bert_encoder(hidden=64, layers=2, heads=4, vocab=300,
                                                                       intermediate=128, seed=99))
    else:
        model = load_int8(file)
    with torch.inference_mode():
        np.save(out, model(torch.as_tensor(np.load(ids))).numpy())
"""


def _outputs_in_fresh_process(tmp_path, cases):
    """cases: [(file, ids)] -> the outputs of load_int8(file) in a new interpreter whose working
    folder holds nothing but the copied files (offline: nothing else can be read or fetched)."""
    import os
    import shutil
    import subprocess
    import sys

    alone = tmp_path / "alone"
    alone.mkdir()
    args = []
    for i, (file, ids) in enumerate(cases):
        factory = str(file).startswith("factory:")
        src = str(file)[len("factory:"):] if factory else str(file)
        dest = alone / f"m{i}.safetensors"
        shutil.copyfile(src, dest)
        np.save(alone / f"ids{i}.npy", ids)
        args += [("factory:" if factory else "") + dest.name, f"ids{i}.npy", f"out{i}.npy"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(alone / "hf")}
    proc = subprocess.run([sys.executable, "-c", _LOAD_ALONE, *args], check=False, cwd=alone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in alone.glob("*.safetensors")) == [f"m{i}.safetensors" for i in range(len(cases))]
    return [np.load(alone / f"out{i}.npy") for i in range(len(cases))]


def _single_thread_outputs(model, ids):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the fresh process: bfloat16 sums are then the same bits
    try:
        with torch.inference_mode():
            return model(torch.as_tensor(ids)).numpy()
    finally:
        torch.set_num_threads(threads)


def tiny_hf_encoder(kind="embedding", seed=0):
    """A small random transformers BERT in a TextEncoder (as load_hf_dir builds it)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from shrinkml.models.text import TextEncoder

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    transformer = (BertForSequenceClassification if kind == "classifier" else BertModel)(config).eval()
    return TextEncoder(transformer, kind=kind, pooling="cls" if kind == "classifier" else "mean",
                       normalize=kind == "embedding", pad_token_id=0).eval()


def _hf_ctx(model, tmp_path):
    ids = np.random.default_rng(0).integers(1, 300, (60, 16)).astype(np.int64)
    ids[::2, 12:] = 0  # padding: the pad id must come back from the file too
    return ids, make_ctx(model, tmp_path, task="fidelity", data=ArrayData(ids))


def test_the_file_alone_rebuilds_hf_and_factory_models_in_a_fresh_process(tmp_path):
    from shrinkml.techniques.quantize_bf16 import file_metadata, save_int8

    cases, expected = [], []
    for kind in ("embedding", "classifier"):
        model = tiny_hf_encoder(kind)
        ids, ctx = _hf_ctx(model, tmp_path)
        q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
        path = tmp_path / f"{kind}.safetensors"
        summary = save_int8(q, path)
        assert summary["bytes"] == path.stat().st_size  # the metadata is in the size reported
        assert "_name_or_path" not in file_metadata(q)["shrinkml.architecture"]
        cases.append((path, ids[:6]))
        expected.append(_single_thread_outputs(q, ids[:6]))
    factory, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=factory), QuantizeBf16Config(keep_float=("embeddings.position",)),
              ctx).state.torch_model
    save_int8(q, tmp_path / "factory.safetensors")
    ids = np.asarray(ctx.splits.test.x[:4])
    cases.append((f"factory:{tmp_path / 'factory.safetensors'}", ids))
    expected.append(_single_thread_outputs(q, ids))

    got = _outputs_in_fresh_process(tmp_path, cases)
    assert [g.shape for g in got] == [(6, 64), (6, 3), (4, 64)]
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and np.array_equal(g, e)


def test_hf_file_loads_in_process_as_the_same_text_encoder(tmp_path):
    """bfloat16 weights too, and the pooler quantize.bf16 dropped stays dropped."""
    from shrinkml.models.text import TextEncoder
    from shrinkml.techniques.quantize_bf16 import load_int8, save_int8

    model = tiny_hf_encoder()
    ids, ctx = _hf_ctx(model, tmp_path)
    for weights in ("int8", "bfloat16"):
        q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(weights=weights), ctx).state.torch_model
        save_int8(q, tmp_path / f"{weights}.safetensors")
        loaded = load_int8(tmp_path / f"{weights}.safetensors")
        assert isinstance(loaded, TextEncoder) and loaded.transformer.pooler is None
        assert (loaded.kind, loaded.pooling, loaded.normalize, loaded.pad_token_id) == ("embedding", "mean", True, 0)
        assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == (12 if weights == "int8" else 0)
        x = torch.as_tensor(ids[:4])
        with torch.inference_mode():
            assert torch.equal(loaded(x), q(x))


def test_head_pruned_hf_model_loads_from_the_file_alone(tmp_path):
    """prune.heads leaves shapes the transformers config cannot express: the file records them."""
    from shrinkml.techniques.prune_transformer import PruneHeadsConfig, apply_heads
    from shrinkml.techniques.quantize_bf16 import load_int8, save_int8

    model = tiny_hf_encoder()
    ids, ctx = _hf_ctx(model, tmp_path)
    pruned = apply_heads(ModelState("torch", torch_model=model), PruneHeadsConfig(head_ratio=0.5), ctx).state
    q = apply(pruned, QuantizeBf16Config(), ctx).state.torch_model
    save_int8(q, tmp_path / "q.safetensors")
    loaded = load_int8(tmp_path / "q.safetensors")
    assert loaded.transformer.encoder.layer[0].attention.self.num_attention_heads == 2
    x = torch.as_tensor(ids[:4])
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))


def test_factory_weights_are_never_read_and_every_tensor_must_come_from_the_file(tmp_path):
    from shrinkml.techniques.quantize_bf16 import load_int8, save_int8

    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    path = tmp_path / "q.safetensors"
    save_int8(q, path)
    with pytest.raises(InputError, match="does not say how to build") as info:
        load_int8(path)
    assert "model=factory()" in str(info.value)

    class Doubled(torch.nn.Module):  # the same layers under another name
        def __init__(self):
            super().__init__()
            self.inner = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128)
            self.extra = torch.nn.Parameter(torch.zeros(3))

    other = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128)
    other.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(InputError, match="do not match tensor for tensor") as info:
        load_int8(path, model=other)
    assert "missing from the file: extra" in str(info.value)
    with pytest.raises(InputError, match="INT8 codes for a layer the architecture does not have") as info:
        load_int8(path, model=Doubled())  # every name moved one level down
    assert "weight_int8" in str(info.value) and "no such module" in str(info.value)

    # built on the meta device, the factory allocates nothing; what only its constructor computes (a
    # non-persistent buffer) is named instead of running with garbage
    with torch.device("meta"):
        meta = bert_encoder(hidden=64, layers=2, heads=4, vocab=300, intermediate=128)
    with pytest.raises(InputError, match="meta device") as info:
        load_int8(path, model=meta)
    assert "embeddings.position_ids" in str(info.value)


def test_unreadable_shrinkml_metadata_is_an_input_error(tmp_path):
    from shrinkml.techniques.quantize_bf16 import load_int8

    model, ctx = setup(tmp_path)
    q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(), ctx).state.torch_model
    save_state_dict(q.state_dict(), tmp_path / "bad.safetensors",
                    metadata={"shrinkml.format": "shrinkml.quantize_bf16/1", "shrinkml.architecture": "[1, 2"})
    with pytest.raises(InputError, match="metadata cannot be read"):
        load_int8(tmp_path / "bad.safetensors", model=model)


def test_every_config_field_is_described():
    assert all(f.description for f in QuantizeBf16Config.model_fields.values())


def test_gptq_codes_sit_on_the_same_grid_and_cut_the_output_error(tmp_path):
    """method: gptq keeps the file format (INT8 codes -127..127, scale = row max / 127) and, computed
    on the calibration split, lowers each layer's output error on other inputs than rounding does."""
    from shrinkml.techniques.quantize_bf16 import load_int8, save_int8

    model = tiny_hf_encoder()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (120, 16)).astype(np.int64)
    ids[::3, 9:] = 0
    ctx = make_ctx(model, tmp_path, task="fidelity", data=ArrayData(ids))
    rtn = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(weights="int8"), ctx).state.torch_model
    out = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(method="gptq"), ctx)
    gptq = out.state.torch_model
    assert out.summary["method"] == "gptq" and out.summary["gptq_layers"] == 12
    layers = {n: m for n, m in gptq.named_modules() if isinstance(m, Int8Linear)}
    originals = dict(model.named_modules())
    for name, m in layers.items():
        assert int(m.weight_int8.abs().max()) <= 127
        torch.testing.assert_close(m.weight_scale, originals[name].weight.detach().abs().amax(1) / 127)
    assert any(not torch.equal(m.weight_int8, dict(rtn.named_modules())[n].weight_int8) for n, m in layers.items())
    x = torch.as_tensor(ctx.splits.test.x)  # rows the step never saw
    with torch.inference_mode():
        ref = model(x).double()
        assert float((gptq(x).double() - ref).pow(2).sum()) < float((rtn(x).double() - ref).pow(2).sum())
    save_int8(gptq, tmp_path / "g.safetensors")
    with torch.inference_mode():
        assert torch.equal(load_int8(str(tmp_path / "g.safetensors"))(x), gptq(x))


def test_gptq_helps_most_where_the_inputs_are_correlated(tmp_path):
    """On a layer whose inputs span few directions (as a trained model's do), GPTQ's compensation
    cuts the output error on held-out inputs well below rounding's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)) * (0.7 ** np.arange(64))[:, None]  # a decaying spectrum
    x = (rng.normal(size=(400, 64)) @ mixing).astype(np.float32)
    ctx = make_ctx(model, tmp_path, task="fidelity", data=ArrayData(x))
    errors = {}
    for method in ("rtn", "gptq"):
        q = apply(ModelState("torch", torch_model=model), QuantizeBf16Config(method=method), ctx).state.torch_model
        layer = q[0]
        held = torch.as_tensor(ctx.splits.test.x)
        with torch.inference_mode():  # the stored weights' error, without bfloat16 compute noise
            w = layer.weight_int8.double() * layer.weight_scale.double()[:, None]
            errors[method] = float((held.double() @ (w - model[0].weight.double()).T).pow(2).sum())
    assert errors["gptq"] < 0.7 * errors["rtn"]
