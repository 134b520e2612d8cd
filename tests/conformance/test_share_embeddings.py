"""Conformance of share.embeddings: embedding tables replaced by uint8 codes and shared codebooks
(standard ONNX ops), the float table gone from the file, ONNX Runtime's output follows the
reconstructed table exactly, and it composes after quantize.weight_only."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.examples.bert import bert_encoder
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.techniques.base import ModelState, get_technique
from shrinkml.techniques.quantize_weight_only import QuantizeWeightOnlyConfig
from shrinkml.techniques.share_embeddings import (
    ShareEmbeddingsConfig,
    apply,
    product_quantize,
    reconstruct,
)
from tests.conftest import make_ctx, tiny_mlp

VOCAB = 600


def tiny_bert() -> torch.nn.Module:
    return bert_encoder(hidden=48, layers=1, heads=4, vocab=VOCAB, intermediate=96)


def setup(tmp_path):
    model = tiny_bert()
    ids = np.random.default_rng(0).integers(1, VOCAB, (80, 12)).astype(np.int64)
    return model, make_ctx(model, tmp_path, task="fidelity", data=ArrayData(ids))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return OrtRunner(model.SerializeToString(), threads=1).run(x)


def test_config_validation():
    assert get_technique("share.embeddings").config_cls is ShareEmbeddingsConfig
    with pytest.raises(ValidationError):
        ShareEmbeddingsConfig(codebook_size=257)  # codes are uint8
    with pytest.raises(ValidationError):
        ShareEmbeddingsConfig(vector_size=0)


def test_product_quantize_is_exact_when_the_codebook_holds_every_vector():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(40, 12)).astype(np.float32)
    codes, books = product_quantize(table, 3, 256, iterations=3, seed=0)  # 40 rows <= 256 entries
    assert codes.dtype == np.uint8 and codes.shape == (40, 4) and books.shape == (4, 40, 3)
    np.testing.assert_allclose(reconstruct(codes, books), table, atol=1e-6)


def test_product_quantize_beats_uniform_codes_of_the_same_bits():
    """8 bits per 3 weights vs uniform 3-bit codes per row (which also need a scale per row): k-means
    on the joint distribution has the lower error on a correlated table."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2000, 2)) @ rng.normal(size=(2, 24))  # low-rank rows: correlated weights
    table = (base + 0.05 * rng.normal(size=base.shape)).astype(np.float32)
    codes, books = product_quantize(table, 3, 256, iterations=20, seed=0)
    pq_err = np.mean((reconstruct(codes, books) - table) ** 2)
    lo, hi = table.min(1, keepdims=True), table.max(1, keepdims=True)
    step = (hi - lo) / 7
    uniform = np.round((table - lo) / step) * step + lo
    assert pq_err < 0.5 * np.mean((uniform - table) ** 2)


def test_tables_become_codes_and_onnxruntime_follows_the_reconstruction(tmp_path):
    from onnx import numpy_helper

    model, ctx = setup(tmp_path)
    out = apply(ModelState("torch", torch_model=model), ShareEmbeddingsConfig(min_rows=VOCAB), ctx)
    proto = out.state.onnx_model
    names = {t.name for t in proto.graph.initializer}
    shared = [t["table"] for t in out.summary["tables"]]
    assert shared == ["embeddings.word.weight"]  # the 512-row position table is below min_rows
    assert not set(shared) & names, "the float table must be gone from the file"
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    codes = [t for t in proto.graph.initializer if t.name.endswith(".shared_codes")]
    assert len(codes) == 1 and codes[0].data_type == onnx.TensorProto.UINT8
    table = out.summary["tables"][0]
    # codes: 8 bits per 3 weights; the 16 x 256 x 3 codebook weighs as much again on a 600-row table
    assert table["bytes_after"] == 600 * 16 + 16 * 256 * 3 * 4 < table["bytes_before"]

    # the same model with the reconstructed table in PyTorch gives what ONNX Runtime gives
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    prefix = shared[0].replace("/", "_")
    book = inits[prefix + ".shared_codebook"].reshape(-1, 256, 3)
    emb = model.embeddings.word
    x = ctx.splits.test.x[:8]
    original = run(out.state.onnx_model, x)  # after
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(reconstruct(inits[prefix + ".shared_codes"], book)))
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(original, expected, atol=2e-4)
    assert out.summary["max_abs_diff_vs_before"] > 0  # it did change the model


def test_composes_after_weight_only_and_shrinks_the_file(tmp_path):
    from shrinkml.techniques.quantize_weight_only import apply as weight_only

    model, ctx = setup(tmp_path)
    wo = weight_only(ModelState("torch", torch_model=model), QuantizeWeightOnlyConfig(bits=4, group_size=16), ctx)
    shared = apply(wo.state, ShareEmbeddingsConfig(), ctx)  # word (600 rows) and position (512) tables
    assert len(shared.summary["tables"]) == 2
    before, after = len(wo.state.onnx_model.SerializeToString()), len(shared.state.onnx_model.SerializeToString())
    assert after < before - 0.4 * (600 + 512) * 48 * 4
    x = ctx.splits.test.x[:8]
    a, b = run(wo.state.onnx_model, x), run(shared.state.onnx_model, x)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.9


def test_no_table_is_a_clear_error(tmp_path):
    model = tiny_mlp()
    with pytest.raises(InputError, match="no embedding table") as info:
        apply(ModelState("torch", torch_model=model), ShareEmbeddingsConfig(), make_ctx(model, tmp_path))
    assert "min_rows" in str(info.value)


def test_width_not_divisible_names_the_table(tmp_path):
    model, ctx = setup(tmp_path)
    with pytest.raises(InputError, match="embeddings.position.weight.*width 48.*vector_size 5"):
        apply(ModelState("torch", torch_model=model), ShareEmbeddingsConfig(vector_size=5, min_rows=100), ctx)


def test_unknown_table_name_lists_the_tables(tmp_path):
    model, ctx = setup(tmp_path)
    with pytest.raises(InputError, match="no embedding table named 'nope'") as info:
        apply(ModelState("torch", torch_model=model), ShareEmbeddingsConfig(tables=("nope",)), ctx)
    assert "embeddings.word.weight" in str(info.value)


def test_parameter_count_is_the_logical_table_size(tmp_path):
    """Codes stand for rows x width weights: the count neither shrinks by the code width nor adds the
    codebook (the report must not claim fewer parameters for the same function shape)."""
    from shrinkml.measure.params import onnx_param_counts
    from shrinkml.runtimes.export import export_onnx

    model, ctx = setup(tmp_path)
    before = onnx_param_counts(export_onnx(model, ctx.example_input))[0]
    out = apply(ModelState("torch", torch_model=model), ShareEmbeddingsConfig(), ctx)
    assert onnx_param_counts(out.state.onnx_model)[0] == before
