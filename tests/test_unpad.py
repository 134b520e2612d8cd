"""``unpad`` and the prepacked bfloat16 kernels: the same function as the padded forward, faster.

Every check compares against the model's own padded forward (Hugging Face BERT) on batches whose
texts have very different lengths, padded on either side, with rows of no tokens at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.models.text import TextEncoder
from shrinkml.nn import unpad as unpad_nn
from shrinkml.nn.int8 import Int8Linear, prepack_available, stacked_linear
from shrinkml.recipe import Recipe
from shrinkml.techniques.base import ModelState, get_technique
from tests.conftest import make_ctx

VOCAB = 120


def bert(kind="embedding", pooling="mean", layers=2, seed=0, positions=160):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=positions, num_labels=3, type_vocab_size=2)
    transformer = (BertForSequenceClassification if kind == "classifier" else BertModel)(config).eval()
    return TextEncoder(transformer, kind=kind, pooling=pooling, normalize=kind == "embedding").eval()


def batch(lengths, width, *, left=False, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int64)
    for row, n in zip(ids, lengths):
        tokens = rng.integers(1, VOCAB, n)
        if left:
            row[width - n:] = tokens
        else:
            row[:n] = tokens
    return torch.from_numpy(ids)


# widths above and below the 64-slot attention rows; several texts share a row when short
LENGTHS = [(20, 3, 11, 1, 0, 15, 7), (150, 2, 64, 65, 9, 140, 31, 1), (5,) * 9]


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_packed_forward_is_the_padded_forward(pooling, left, lengths):
    enc = bert(pooling=pooling)
    width = max(lengths) + 6  # columns of padding only: dropped first
    x = batch(lengths, width, left=left)
    with torch.inference_mode():
        ref = enc(x)
        got = unpad_nn.packed_forward(enc, x)
    # where it is not the same function for the batch it declines, and the model runs as before
    declines = (pooling == "max" and 0 in lengths) or (pooling == "cls" and (left or 0 in lengths))
    if declines:
        assert got is None
        enc.unpad = True
        with torch.inference_mode():
            assert torch.equal(enc(x), ref)
        return
    assert got is not None and got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-5


def test_token_types_and_a_classifier_head():
    enc = bert()
    x = batch((12, 4, 9), 16)
    types = (torch.arange(16)[None] >= 5).long().expand(3, 16).contiguous()
    with torch.inference_mode():
        assert float((unpad_nn.packed_forward(enc, x, types) - enc(x, token_type_ids=types)).abs().max()) < 1e-5
    clf = bert(kind="classifier", pooling="cls")
    with torch.inference_mode():
        assert float((unpad_nn.packed_forward(clf, x) - clf(x)).abs().max()) < 1e-5


def test_the_packed_path_runs_only_in_eval_on_ids_alone(monkeypatch):
    enc = bert()
    enc.unpad = True
    calls = []
    real = unpad_nn.packed_forward
    monkeypatch.setattr(unpad_nn, "packed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = batch((6, 2), 8)
    with torch.inference_mode():
        enc(x)
        enc(x, attention_mask=(x != 0).long())  # an explicit mask: the usual forward
    enc.train()
    enc(x)  # training (dropout): the usual forward
    assert calls == [1]


def test_step_checks_the_function_and_summarises_the_padding(tmp_path):
    enc = bert()
    ids = batch([3, 30, 7, 12] * 10, 48).numpy()
    state = ModelState("torch", torch_model=enc)
    ctx = make_ctx(enc, tmp_path, task="fidelity", data=ArrayData(ids))
    result = get_technique("unpad").apply(state, get_technique("unpad").config_cls(), ctx)
    s = result.summary
    assert result.state.torch_model.unpad and not getattr(enc, "unpad", False)  # the input is untouched
    real = ctx.splits.calibration.x != 0
    assert s["max_abs_diff_vs_padded_forward"] < 1e-5
    assert s["calibration_pad_only_columns"] == 48 - real.sum(1).max() > 0
    assert s["calibration_tokens_computed_fraction"] == pytest.approx(real.mean())
    assert real.mean() < 0.5


def test_models_it_does_not_cover_are_refused_with_the_reason(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    distil = TextEncoder(DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4,
                                                          hidden_dim=64)).eval()).eval()
    ids = batch((4, 2) * 10, 6).numpy()
    for model, found in ((distil, "DistilBertModel, not a BERT model"), (nn.Sequential(nn.Linear(4, 2)), "not a Hugging Face")):
        with pytest.raises(InputError, match="unpad computes BERT text encoders only") as info:
            get_technique("unpad").apply(ModelState("torch", torch_model=model), get_technique("unpad").config_cls(),
                                         make_ctx(model, tmp_path, task="fidelity", data=ArrayData(ids)))
        assert found in str(info.value) and "remove the unpad step" in str(info.value)


def test_it_may_follow_quantize_bf16_and_the_file_keeps_it(tmp_path):
    from shrinkml.techniques.quantize_bf16 import load_int8, save_int8

    Recipe.from_steps([{"technique": "quantize.bf16"}, {"technique": "unpad"}]).check_model_kind("torch")
    with pytest.raises(InputError, match="comes after quantize.bf16"):  # not a step for another runtime
        Recipe.from_steps([{"technique": "quantize.bf16"}, {"technique": "quantize.dynamic"}]).check_model_kind("torch")
    enc = bert()
    ids = batch([3, 30, 7, 12] * 8, 40).numpy()
    ctx = make_ctx(enc, tmp_path, task="fidelity", data=ArrayData(ids))
    state = ModelState("torch", torch_model=enc)
    for name in ("quantize.bf16", "unpad"):
        state = get_technique(name).apply(state, get_technique(name).config_cls(), ctx).state
    model = state.torch_model
    save_int8(model, tmp_path / "m.safetensors")
    loaded = load_int8(str(tmp_path / "m.safetensors"))
    assert loaded.unpad is True
    x = torch.from_numpy(ids)
    with torch.inference_mode():
        packed = loaded(x)
        loaded.unpad = False
        padded = loaded(x)
    assert packed.dtype == torch.float32
    assert F.cosine_similarity(packed, padded).min() > 0.999  # bfloat16 sums in another order


@pytest.mark.skipif(not prepack_available(), reason="this PyTorch / CPU has no oneDNN bfloat16 linear kernel")
def test_prepacked_kernels_compute_f_linear_and_follow_weight_changes(monkeypatch):
    torch.manual_seed(0)
    parts = tuple(Int8Linear(nn.Linear(32, n)) for n in (32, 32, 16))
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        for p in parts:
            assert torch.equal(p(x), F.linear(x, p.weight, p.bias))
        owner = nn.Module()
        want = torch.cat([F.linear(x, p.weight, p.bias) for p in parts], -1)
        assert torch.equal(stacked_linear(owner, parts, x), want)
        # new codes (as load_state_dict refreshes the weight): the packed copies follow
        state = {k: v.clone() for k, v in parts[0].state_dict().items()}
        state["weight_int8"] = -state["weight_int8"]
        parts[0].load_state_dict(state)
        assert torch.equal(parts[0](x), F.linear(x, parts[0].weight, parts[0].bias))
        want = torch.cat([F.linear(x, p.weight, p.bias) for p in parts], -1)
        assert torch.equal(stacked_linear(owner, parts, x), want)
    monkeypatch.setenv("SHRINKML_NO_PREPACK", "1")
    assert not prepack_available() and stacked_linear(owner, parts, x) is None


def test_macs_count_the_prepacked_products():
    from shrinkml.measure.macs import torch_macs

    model = nn.Sequential(Int8Linear(nn.Linear(64, 32)))
    model.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16),))
    assert torch_macs(model, torch.zeros(3, 5, 64)) == 5 * 64 * 32
