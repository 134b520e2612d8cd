"""Recovery fine-tuning on the fine-tune split, optionally distilling from the original model.

Loss with labels: ``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)``
(Hinton et al., 2015); without labels, distillation alone. Early stopping (``patience``) scores
the validation split, like every other choice made inside a run, and trains on the whole fine-tune
split; only when there is no validation split (None or empty) is a ``validation_fraction`` slice of
the fine-tune split held out instead. The test split stays untouched either way; the summary's
``early_stopping_on`` says which data was used.

Embedding models (sentence encoders) have no classes to soften: for them the distillation loss is
``1 - cos(student, teacher) + MSE(student, teacher)`` on the output embeddings (``loss: cosine``),
and labels are never used. ``loss: auto`` picks it when the task is ``embedding`` or the original
model's outputs are L2-normalized, KL otherwise. ``hidden_weight`` adds an MSE between the
student's and the teacher's final-layer hidden states (text models, ``TextEncoder``), which helps
a layer-pruned student recover (as in DistilBERT / TinyBERT).

>>> FinetuneConfig(loss="cosine", hidden_weight=1.0, epochs=2)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable

if TYPE_CHECKING:
    import torch


class FinetuneConfig(StepConfig):
    """Hyperparameters of recovery training."""

    technique: Literal["finetune"] = Field(
        "finetune", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    epochs: int = Field(3, ge=1, le=10_000, description="maximum passes over the fine-tune split",
                        json_schema_extra=searchable(choices=(10, 20, 40)))
    lr: float = Field(1e-3, gt=0, lt=10, description="learning rate of the optimizer",
                     json_schema_extra=searchable(choices=(0.001, 0.003)))
    batch_size: int = Field(64, ge=1, description="training examples per optimizer step")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam, or SGD with momentum 0.9")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay passed to the optimizer")
    distill: bool = Field(True, description="learn from the original model's outputs too")
    temperature: float = Field(4.0, gt=0, description="softening temperature of the distillation KL")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss (1 = only KL)")
    validation_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="part of the fine-tune split held out for early stopping, only when the run has no"
        " validation split (early stopping uses the validation split when there is one)",
    )
    patience: int | None = Field(
        2,
        ge=1,
        description="epochs without a lower validation loss before stopping (validation split, else the"
        " fine-tune holdout); unset: run every epoch",
    )
    loss: Literal["auto", "kl", "cosine", "mse"] = Field(
        "auto",
        description="distillation loss: kl (classifiers), cosine (1 - cos + MSE, embedding models), mse;"
        " auto picks cosine for embedding tasks or L2-normalized outputs, kl otherwise",
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of an extra MSE between final-layer hidden states (text models only)"
    )


def distillation_loss(student_out, teacher_out, y, config, use_labels: bool, loss: str = "kl"):
    """Cross-entropy with labels and/or temperature-scaled KL to the teacher, weighted by ``alpha``
    (``config`` needs ``distill``, ``temperature`` and ``alpha``). ``loss="cosine"`` or ``"mse"``
    compare output embeddings instead (no labels, no temperature)."""
    import torch.nn.functional as F

    if loss in ("cosine", "mse"):
        mse = F.mse_loss(student_out, teacher_out)
        if loss == "mse":
            return mse
        return (1 - F.cosine_similarity(student_out, teacher_out, dim=-1)).mean() + mse
    terms = []
    if use_labels:
        ce = F.cross_entropy(student_out, y)
        terms.append(ce if not config.distill else (1 - config.alpha) * ce)
    if config.distill:
        t = config.temperature
        kl = F.kl_div(
            F.log_softmax(student_out / t, dim=1),
            F.log_softmax(teacher_out / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        terms.append((config.alpha if use_labels else 1.0) * t * t * kl)
    return sum(terms)


def training_data(ctx: StepContext, *, distill: bool, technique: str, alternative: str):
    """The fine-tune split and whether its labels are used; fails clearly when there is nothing to
    learn from. Shared by every step that trains (finetune, quantize.qat)."""
    data = ctx.splits.finetune
    if len(data) == 0:
        raise InputError(
            f"{technique} has no data to train on",
            where="fine-tune split",
            expected="at least one example in the fine-tune split",
            found="0 examples",
            fix=f"give more data, or {alternative}",
        )
    use_labels = data.y is not None and ctx.task.needs_labels
    if not use_labels and not distill:
        raise InputError(
            f"{technique} has neither labels nor distillation to learn from",
            where=f"{technique}.distill",
            expected="labels in the data, or distill: true",
            fix="set distill: true to learn from the original model's outputs",
        )
    if distill and ctx.teacher is None:
        raise InputError("distillation needs the original PyTorch model", where=f"{technique}.distill")
    return data, use_labels


def _resolve_loss(config: FinetuneConfig, ctx: StepContext, reference: torch.nn.Module, x: np.ndarray) -> str:
    """The distillation loss ``auto`` stands for: cosine for embedding models, KL for classifiers."""
    import torch

    if config.loss != "auto":
        return config.loss
    task = getattr(ctx.task, "name", None)
    if task in ("embedding", "classification"):
        return "cosine" if task == "embedding" else "kl"
    with torch.no_grad():
        out = reference.eval()(torch.from_numpy(np.ascontiguousarray(x[:8])))
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] > 1:
        norms = out.norm(dim=1)
        if torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            return "cosine"  # L2-normalized outputs are embeddings, not logits
    return "kl"


def _hidden_states(model: torch.nn.Module, role: str):
    """A store that receives the final-layer hidden states of a text model on each forward, and the
    hook handle that fills it."""
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(model, "pad_token_id"):
        raise InputError(
            "hidden_weight needs text models whose transformer's hidden states can be compared",
            where="finetune.hidden_weight",
            expected=f"the {role} to be a TextEncoder (a module with .transformer and .pad_token_id)",
            found=type(model).__name__,
            fix="set hidden_weight: 0",
        )
    base = getattr(transformer, "base_model", transformer)
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _args, out) -> None:
        store["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    return store, base.register_forward_hook(hook)


def _hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the non-padding token positions."""
    if student_h.shape != teacher_h.shape:
        raise InputError(
            "the student's and the original model's hidden states have different shapes",
            where="finetune.hidden_weight",
            expected=f"{tuple(teacher_h.shape)}",
            found=f"{tuple(student_h.shape)}",
            fix="set hidden_weight: 0 (the hidden size was changed)",
        )
    weights = mask.unsqueeze(-1).to(student_h.dtype)
    return ((student_h - teacher_h).pow(2) * weights).sum() / (weights.sum() * student_h.shape[-1]).clamp(min=1)


def _early_stopping_data(ctx: StepContext, config: FinetuneConfig, use_labels: bool, n_finetune: int):
    """What early stopping scores: ``(x, y, n, description)``. The validation split (as tensors) when
    the run has one with examples (and labels, where training uses them); otherwise ``x`` is None and
    ``n`` is the size of the slice of the fine-tune split to hold out (0: no early stopping)."""
    import torch

    if not config.patience:
        return None, None, 0, "off (patience unset)"
    validation = ctx.splits.validation
    reason = "no validation split"
    if validation is not None and len(validation) > 0:
        if not use_labels or validation.y is not None:
            x = torch.from_numpy(np.ascontiguousarray(validation.x))
            y = torch.from_numpy(validation.y.astype(np.int64)) if use_labels else None
            return x, y, len(validation), f"validation ({len(validation)} examples)"
        reason = "the validation split has no labels"
    n_val = int(round(n_finetune * config.validation_fraction))
    if n_val == 0:
        return None, None, 0, f"off ({reason}, and validation_fraction {config.validation_fraction} holds out none)"
    note = "" if validation is None or len(validation) == 0 else f"; {reason}"
    return None, None, n_val, f"finetune holdout ({n_val} examples{note})"


@register("finetune", FinetuneConfig, stage="recovery")
def apply(state: ModelState, config: FinetuneConfig, ctx: StepContext) -> StepResult:
    import torch

    data, use_labels = training_data(
        ctx, distill=config.distill, technique="finetune", alternative="remove the finetune step"
    )

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    model = copy.deepcopy(state.torch_model)
    teacher = ctx.teacher.eval() if config.distill else None
    loss_kind = _resolve_loss(config, ctx, teacher if teacher is not None else model, data.x)
    if loss_kind != "kl":
        if not config.distill:
            raise InputError(
                f"loss {loss_kind!r} compares with the original model's outputs, but distill is false",
                where="finetune.loss",
                expected="distill: true for embedding losses",
                fix="set distill: true, or loss: kl for a classifier",
            )
        use_labels = False  # an embedding model has no classes to learn labels for
    hidden_store = teacher_store = None
    handles = []
    if config.hidden_weight > 0:
        if teacher is None:
            raise InputError("hidden_weight needs distill: true", where="finetune.hidden_weight", fix="set distill: true")
        hidden_store, h1 = _hidden_states(model, "model")
        teacher_store, h2 = _hidden_states(teacher, "original model")
        handles = [h1, h2]
    pad_id = getattr(model, "pad_token_id", 0)

    def batch_loss(xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            tb = teacher(xb) if teacher is not None else None
        loss = distillation_loss(model(xb), tb, yb, config, use_labels, loss_kind)
        if hidden_store is not None:
            loss = loss + config.hidden_weight * _hidden_mse(hidden_store["h"], teacher_store["h"], xb != pad_id)
        return loss

    rng = np.random.default_rng(ctx.seed)
    order = rng.permutation(len(data))
    x_all = torch.from_numpy(np.ascontiguousarray(data.x))
    y_all = torch.from_numpy(data.y.astype(np.int64)) if use_labels else None
    x_val, y_val, n_val, early_stopping_on = _early_stopping_data(ctx, config, use_labels, len(data))
    if x_val is None and n_val:  # fallback: hold out a slice of the fine-tune split
        val_idx, train_idx = order[:n_val], order[n_val:]
        held = torch.from_numpy(val_idx)
        x_val, y_val = x_all[held], (y_all[held] if y_all is not None else None)
    else:
        train_idx = order

    masks = {}
    params = dict(model.named_parameters())
    for name in state.sparse_params:
        if name in params:
            masks[name] = params[name].detach() != 0

    def apply_masks() -> None:
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)

    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)

    def evaluate(x: torch.Tensor, y: torch.Tensor | None) -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(x), 512):
                xb = x[start : start + 512]
                yb = y[start : start + 512] if y is not None else None
                total += float(batch_loss(xb, yb)) * len(xb)
        return total / max(len(x), 1)

    try:
        best_loss, best_state, best_epoch, stale = float("inf"), None, 0, 0
        history = []
        batches_per_epoch = max(1, len(train_idx) // config.batch_size)
        with ctx.progress.bar("finetune", total=config.epochs * batches_per_epoch) as bar:
            for epoch in range(config.epochs):
                model.train()
                perm = train_idx[rng.permutation(len(train_idx))]
                running = 0.0
                for i in range(batches_per_epoch):
                    b = torch.from_numpy(perm[i * config.batch_size : (i + 1) * config.batch_size])
                    yb = y_all[b] if y_all is not None else None
                    loss = batch_loss(x_all[b], yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    apply_masks()
                    running += float(loss.detach())
                    bar.advance(1, status=f"epoch {epoch + 1} loss {running / (i + 1):.4f}")
                entry = {"epoch": epoch + 1, "train_loss": round(running / batches_per_epoch, 6)}
                if n_val:
                    val = evaluate(x_val, y_val)
                    entry["val_loss"] = round(val, 6)
                    if val < best_loss - 1e-6:
                        best_loss, best_epoch, stale = val, epoch + 1, 0
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        stale += 1
                history.append(entry)
                if ctx.on_epoch is not None:
                    model.eval()
                    ctx.on_epoch(epoch + 1, model)
                if n_val and config.patience is not None and stale >= config.patience:
                    break
    finally:  # the teacher is shared with later steps: leave no hook on it
        for handle in handles:
            handle.remove()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    summary = {
        "epochs_run": len(history),
        "best_epoch": best_epoch or len(history),
        "train_examples": int(len(train_idx)),
        "validation_examples": int(n_val),
        "early_stopping_on": early_stopping_on,
        "used_labels": use_labels,
        "distill": config.distill,
        "loss": loss_kind if config.distill else "ce",
        "hidden_weight": config.hidden_weight,
        "history": history,
    }
    return StepResult(ModelState("torch", torch_model=model, sparse_params=state.sparse_params), summary)
