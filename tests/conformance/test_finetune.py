"""Conformance of the finetune technique: config round-trip, applies to MLP and CNN, recovers a
damaged model, keeps magnitude-pruned zeros, rejects invalid values."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from shrinkml.errors import InputError
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.finetune import FinetuneConfig, apply, distillation_loss
from tests.conftest import make_ctx, toy_data


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).mean())


def test_config_round_trip():
    cfg = FinetuneConfig(epochs=5, lr=0.01, distill=False)
    assert FinetuneConfig.model_validate(cfg.model_dump()) == cfg
    assert FinetuneConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        cfg.epochs = 3  # frozen


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"lr": 0}, {"alpha": 1.5}, {"temperature": 0}, {"batch_size": 0}, {"lr_rate": 1}])
def test_invalid_values_rejected(bad):
    with pytest.raises(ValidationError):
        FinetuneConfig(**bad)


@pytest.mark.parametrize("distill", [False, True])
def test_training_raises_accuracy_and_does_not_mutate(tiny_model, tmp_path, distill):
    data = toy_data(400)
    ctx = make_ctx(tiny_model, tmp_path, data=data)
    before = copy.deepcopy(tiny_model.state_dict())
    acc0 = _accuracy(tiny_model, ctx.splits.test)
    cfg = FinetuneConfig(epochs=15, lr=5e-3, distill=distill, alpha=0.3, patience=None, batch_size=32)
    out = apply(ModelState("torch", torch_model=tiny_model), cfg, ctx)
    acc1 = _accuracy(out.state.torch_model, ctx.splits.test)
    if distill:  # the teacher is the untrained model itself: matching it must not hurt, labels must help
        assert acc1 >= acc0
    else:
        assert acc1 > acc0 + 0.3, (acc0, acc1)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])
    assert out.summary["epochs_run"] == 15
    assert out.state.torch_model(torch.from_numpy(ctx.splits.test.x[:3])).shape == (3, 10)


def test_distillation_pulls_student_to_teacher(tmp_path):
    from tests.conftest import tiny_mlp

    teacher = tiny_mlp(seed=1)
    student = tiny_mlp(seed=2)
    ctx = make_ctx(teacher, tmp_path, task="fidelity")
    x = torch.from_numpy(ctx.splits.test.x)

    def agreement(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    before = agreement(student)
    out = apply(ModelState("torch", torch_model=student), FinetuneConfig(epochs=30, lr=5e-3, patience=None), ctx)
    assert agreement(out.state.torch_model) > max(before + 0.2, 0.6)
    assert out.summary["used_labels"] is False


def test_keeps_pruned_zeros(tmp_path):
    from tests.conftest import tiny_mlp

    model = tiny_mlp()
    with torch.no_grad():
        model[1].weight[:, ::2] = 0
    ctx = make_ctx(model, tmp_path)
    out = apply(
        ModelState("torch", torch_model=model, sparse_params=frozenset({"1.weight"})),
        FinetuneConfig(epochs=2, lr=1e-2),
        ctx,
    )
    w = out.state.torch_model[1].weight
    assert torch.count_nonzero(w[:, ::2]) == 0
    assert torch.count_nonzero(w[:, 1::2]) > 0


def test_no_labels_and_no_distill_is_an_input_error(tmp_path):
    from tests.conftest import tiny_mlp

    model = tiny_mlp()
    ctx = make_ctx(model, tmp_path, task="fidelity")
    with pytest.raises(InputError, match="distill: true"):
        apply(ModelState("torch", torch_model=model), FinetuneConfig(distill=False), ctx)


def test_early_stopping_uses_validation_not_test(tmp_path):
    from tests.conftest import tiny_mlp

    ctx = make_ctx(tiny_mlp(), tmp_path, data=toy_data(300))
    out = apply(ModelState("torch", torch_model=tiny_mlp()), FinetuneConfig(epochs=40, lr=0.05, patience=1), ctx)
    assert out.summary["validation_examples"] == len(ctx.splits.validation) > 0
    assert out.summary["epochs_run"] < 40
    assert np.isfinite(out.summary["history"][-1]["val_loss"])


class _Recording:
    """Wraps a split and records that it was read (``x``, ``y``, ``len``)."""

    def __init__(self, data) -> None:
        self._data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name):
        self.reads += 1
        return getattr(self._data, name)


def test_early_stopping_reads_the_validation_split_and_trains_on_all_finetune(tmp_path):
    from tests.conftest import tiny_mlp

    ctx = make_ctx(tiny_mlp(), tmp_path, data=toy_data(300))
    validation = _Recording(ctx.splits.validation)
    ctx = dataclasses.replace(ctx, splits=dataclasses.replace(ctx.splits, validation=validation))
    n_val, n_ft = len(validation), len(ctx.splits.finetune)
    assert n_val > 0
    out = apply(ModelState("torch", torch_model=tiny_mlp()), FinetuneConfig(epochs=3, lr=0.05, patience=2), ctx)
    s = out.summary
    assert s["early_stopping_on"] == f"validation ({n_val} examples)"
    assert s["validation_examples"] == n_val
    assert s["train_examples"] == n_ft  # nothing held out of the fine-tune split
    assert validation.reads > 0 and all("val_loss" in e for e in s["history"])

    # scored as the holdout was: the training loss (labels + distillation) on the validation split
    cfg = FinetuneConfig(epochs=1, lr=0.05, patience=2)
    one = apply(ModelState("torch", torch_model=tiny_mlp()), cfg, ctx)  # one epoch: the model it scored
    val = ctx.splits.validation
    with torch.no_grad():
        x, y = torch.from_numpy(val.x), torch.from_numpy(val.y.astype(np.int64))
        expected = float(distillation_loss(one.state.torch_model(x), ctx.teacher(x), y, cfg, True))
    assert one.summary["history"][0]["val_loss"] == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("validation", ["none", "empty"])
def test_early_stopping_falls_back_to_a_finetune_holdout(tmp_path, validation):
    from tests.conftest import tiny_mlp

    ctx = make_ctx(tiny_mlp(), tmp_path, data=toy_data(300))
    split = None if validation == "none" else ctx.splits.validation.subset(np.arange(0))
    ctx = dataclasses.replace(ctx, splits=dataclasses.replace(ctx.splits, validation=split))
    n_ft = len(ctx.splits.finetune)
    n_hold = round(n_ft * 0.1)
    out = apply(ModelState("torch", torch_model=tiny_mlp()), FinetuneConfig(epochs=3, lr=0.05, patience=2), ctx)
    s = out.summary
    assert s["early_stopping_on"] == f"finetune holdout ({n_hold} examples)"
    assert s["validation_examples"] == n_hold and s["train_examples"] == n_ft - n_hold
    assert all(np.isfinite(e["val_loss"]) for e in s["history"])

    again = apply(ModelState("torch", torch_model=tiny_mlp()), FinetuneConfig(epochs=3, lr=0.05, patience=2), ctx)
    assert again.summary == s  # deterministic for a seed
    for a, b in zip(out.state.torch_model.state_dict().values(), again.state.torch_model.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_off_says_so(tmp_path):
    from tests.conftest import tiny_mlp

    ctx = make_ctx(tiny_mlp(), tmp_path, data=toy_data(300))
    out = apply(ModelState("torch", torch_model=tiny_mlp()), FinetuneConfig(epochs=2, lr=0.05, patience=None), ctx)
    assert out.summary["early_stopping_on"] == "off (patience unset)"
    assert out.summary["train_examples"] == len(ctx.splits.finetune) and out.summary["validation_examples"] == 0
