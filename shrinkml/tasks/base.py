"""What a task is: what the data must hold, how a model's outputs are scored per example (so every
metric gets a bootstrap CI and the drop a paired one), and which metric the budget reads.

A task is one module with one ``Task`` subclass, registered in ``shrinkml.core.registry.TASKS``
(``"name": "shrinkml.tasks.module:TASK"``). ``Task`` gives the checks every task shares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError

_SHOWN = 5  # offending label values named in an error
WORST_FRACTION = 0.05  # worst5_cosine: the mean of the lowest 5% of per-example cosines
NEIGHBOURS = 10  # top10_agreement


def _top1_agreement(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return None
    return (outputs.argmax(axis=1) == reference.argmax(axis=1)).astype(np.float64)


def fidelity_scores(outputs: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example closeness of ``outputs`` to ``reference`` (the original model's outputs)."""
    out = outputs.reshape(len(outputs), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    ref_norm = np.linalg.norm(ref, axis=1)
    out_norm = np.linalg.norm(out, axis=1)
    tiny = np.finfo(np.float64).tiny
    scores = {
        "cosine_similarity": (out * ref).sum(axis=1) / np.maximum(out_norm * ref_norm, tiny),
        "relative_error": np.linalg.norm(out - ref, axis=1) / np.maximum(ref_norm, tiny),
    }
    agreement = _top1_agreement(outputs, reference)
    if agreement is not None:
        scores["top1_agreement"] = agreement
    return scores


def worst_fraction_mean(values: np.ndarray, fraction: float = WORST_FRACTION) -> float:
    """Mean of the lowest ``fraction`` of ``values`` (at least one value)."""
    arr = np.sort(np.asarray(values, dtype=np.float64))
    return float(arr[: max(1, int(np.ceil(fraction * arr.size)))].mean())


def neighbour_agreement(outputs: np.ndarray, reference: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Per example: |NN_k(reference) & NN_k(outputs)| / k, its ``k`` nearest neighbours by cosine
    among the other examples (``k`` is capped at ``n - 1``)."""
    n = len(outputs)
    k = min(k, n - 1)
    if k < 1:
        return np.ones(n)

    def neighbours(emb: np.ndarray) -> np.ndarray:
        e = emb.reshape(n, -1).astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), np.finfo(np.float64).tiny)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)  # never its own neighbour
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    ref_nn, out_nn = neighbours(reference), neighbours(outputs)
    return np.array([len(set(a) & set(b)) / k for a, b in zip(ref_nn.tolist(), out_nn.tolist())])


def _check_finite(splits: Splits, outputs: np.ndarray, where: str) -> None:
    if np.issubdtype(outputs.dtype, np.floating) and not np.isfinite(outputs).all():
        bad = int((~np.isfinite(outputs)).sum())
        raise InputError(
            "the model's outputs on the first batch are not finite (NaN or inf), so no metric on them"
            " means anything",
            where=f"{where} on {splits.source}",
            expected="finite outputs",
            found=f"{bad} of {outputs.size} output values NaN or inf on a batch of {len(outputs)} examples",
            fix="check the weights and the input scaling (the model must be numerically sound before"
            " it is compressed)",
        )


def check_labels_in_range(splits: Splits, n_classes: int, *, label_free_fix: bool) -> None:
    """Every label of every split in ``[0, n_classes)``: a label the model cannot predict scores 0
    however good the model is."""
    for split, data in splits.named():
        y = data.y
        if y is None or not len(y):
            continue
        bad = (y < 0) | (y >= n_classes)
        if bad.any():
            values = np.unique(y[bad])
            shown = ", ".join(str(int(v)) for v in values[:_SHOWN]) + (", ..." if len(values) > _SHOWN else "")
            raise InputError(
                f"labels outside the model's {n_classes} classes: accuracy would count them as wrong"
                " whatever the model predicts",
                where=f"{splits.source}, {split} split",
                expected=f"labels in [0, {n_classes}) (the model outputs {n_classes} class scores)",
                found=f"{int(bad.sum())} of {len(y)} labels outside it (values {shown})",
                fix="map the labels to 0..C-1 in the order of the model's outputs, or check that the data"
                " belongs to this model" + ("; or drop y to measure without labels" if label_free_fix else ""),
            )


def accuracy_scores(outputs: np.ndarray, data: ArrayData) -> dict[str, np.ndarray]:
    """``accuracy`` per example where there are labels and class scores, else nothing."""
    if data.y is not None and outputs.ndim == 2 and outputs.shape[1] >= 2:
        return {"accuracy": (outputs.argmax(axis=1) == data.y).astype(np.float64)}
    return {}


class Task(ABC):
    """Base of every task. Subclasses set ``name`` and ``needs_labels`` and implement
    ``primary_metric`` and ``scores``; they extend the checks where the task means more."""

    name: str = ""
    needs_labels: bool = False
    description: str = ""
    causal_lm: bool = False  # measures decoder language models (token windows, logits), nothing else

    @abstractmethod
    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        """The metric the budget reads, for outputs of this shape."""

    @abstractmethod
    def scores(self, outputs: np.ndarray, data: ArrayData, reference: np.ndarray) -> dict[str, np.ndarray]:
        """Per-example scores on ``data``; ``reference`` holds the original model's outputs."""

    def statistics(self) -> dict[str, tuple[str, Callable[[np.ndarray], float]]]:
        """Metrics that are not means: ``name -> (per-example score they summarise, statistic)``;
        their CI bootstraps the statistic itself."""
        return {}

    def check_data(self, splits: Splits) -> None:
        if self.needs_labels and splits.test.y is None:
            raise InputError(
                f"--task {self.name} needs labels, but the data has none",
                where=splits.source,
                expected="an array 'y' of integer class labels",
                fix="add labels 'y', or use --task fidelity to measure closeness to the original model",
            )

    def check_model(self, loaded: Any, splits: Splits) -> None:
        """Refuse a model the task cannot mean (``loaded``: a ``shrinkml.models.LoadedModel``)."""

    def check_outputs(self, splits: Splits, outputs: np.ndarray, where: str) -> None:
        """Refuse outputs the task cannot score, seen on one batch before any work: ``outputs`` is the
        model's output array on an example batch, ``where`` names the model for the message. Wherever
        accuracy is computed, every label must be one of the model's classes."""
        outputs = np.asarray(outputs)
        _check_finite(splits, outputs, where)
        if outputs.ndim == 2 and outputs.shape[1] >= 2:
            check_labels_in_range(splits, outputs.shape[1], label_free_fix=not self.needs_labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Task({self.name!r})"
