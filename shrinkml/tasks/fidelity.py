"""``fidelity``: label-free closeness of the compressed model's outputs to the original's (top-1
agreement for class scores, else cosine), plus accuracy where the data has labels."""

from __future__ import annotations

import numpy as np

from shrinkml.data import ArrayData
from shrinkml.tasks.base import Task, accuracy_scores, fidelity_scores


class Fidelity(Task):
    name = "fidelity"
    needs_labels = False
    description = "label-free closeness to the original model"

    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        is_scores = len(outputs_shape) == 2 and outputs_shape[1] >= 2
        return "top1_agreement" if is_scores else "cosine_similarity"

    def scores(self, outputs: np.ndarray, data: ArrayData, reference: np.ndarray) -> dict[str, np.ndarray]:
        return {**accuracy_scores(outputs, data), **fidelity_scores(outputs, reference)}


TASK = Fidelity()
