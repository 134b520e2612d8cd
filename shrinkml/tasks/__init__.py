"""What "accuracy" means for a run. A task turns model outputs on the test split into per-example
scores (so every metric gets a bootstrap CI and the drop a paired one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError

TaskName = Literal["classification", "fidelity"]


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


@dataclass(frozen=True)
class Task:
    """``classification``: top-1 accuracy against labels. ``fidelity``: label-free closeness of the
    compressed model's outputs to the original's (top-1 agreement for class scores, else cosine)."""

    name: TaskName

    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        if self.name == "classification":
            return "accuracy"
        is_scores = len(outputs_shape) == 2 and outputs_shape[1] >= 2
        return "top1_agreement" if is_scores else "cosine_similarity"

    def check_data(self, splits: Splits) -> None:
        if self.name == "classification" and splits.test.y is None:
            raise InputError(
                "--task classification needs labels, but the data has none",
                where=splits.source,
                expected="an array 'y' of integer class labels",
                fix="add labels 'y', or use --task fidelity to measure closeness to the original model",
            )

    def scores(
        self, outputs: np.ndarray, data: ArrayData, reference: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Per-example scores on ``data``; ``reference`` holds the original model's outputs."""
        scores: dict[str, np.ndarray] = {}
        if data.y is not None and outputs.ndim == 2 and outputs.shape[1] >= 2:  # labels: accuracy too
            scores["accuracy"] = (outputs.argmax(axis=1) == data.y).astype(np.float64)
        if self.name == "fidelity":
            scores.update(fidelity_scores(outputs, reference))
        return scores


def get_task(name: str) -> Task:
    if name in ("classification", "fidelity"):
        return Task(name)
    raise InputError(
        f"unknown task {name!r}",
        where="--task",
        expected="classification or fidelity",
        fix="pass --task classification (needs labels) or --task fidelity (label-free)",
    )
