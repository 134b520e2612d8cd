"""``classification``: top-1 accuracy against the labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.tasks.base import Task, accuracy_scores


class Classification(Task):
    name = "classification"
    needs_labels = True
    description = "accuracy against labels"

    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        return "accuracy"

    def scores(self, outputs: np.ndarray, data: ArrayData, reference: np.ndarray) -> dict[str, np.ndarray]:
        return accuracy_scores(outputs, data)

    def check_model(self, loaded: Any, splits: Splits) -> None:
        text = getattr(loaded, "text", None)
        if text is not None and text.kind == "embedding":
            raise InputError(
                "--task classification needs class scores, but this directory holds an embedding model",
                where=loaded.source,
                fix="use --task embedding (closeness of the embeddings to the original model's) for an"
                " embedding model, or pass a *ForSequenceClassification model directory",
            )

    def check_outputs(self, splits: Splits, outputs: np.ndarray, where: str) -> None:
        outputs = np.asarray(outputs)
        if not (outputs.ndim == 2 and outputs.shape[1] >= 2):
            raise InputError(
                "--task classification needs class scores from the model, one per class",
                where=f"{where} on {splits.source}",
                expected="outputs of shape (batch, classes) with at least 2 classes",
                found=f"outputs of shape {tuple(outputs.shape)}",
                fix="return one logit per class (2 for a binary classifier), or use --task fidelity to"
                " measure closeness to the original model without labels",
            )
        super().check_outputs(splits, outputs, where)


TASK = Classification()
