"""``embedding``: label-free fidelity of a text embedding model to the original on the test texts:
per-example cosine (primary: the budget's drop is ``1 - cosine``, paired against the original's
exact 1.0), ``worst5_cosine`` (mean of the lowest 5% of cosines, CI by bootstrapping that
statistic) and ``top10_agreement`` (overlap of each text's 10 nearest test neighbours)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.tasks.base import Task, _check_finite, fidelity_scores, neighbour_agreement, worst_fraction_mean


class Embedding(Task):
    name = "embedding"
    needs_labels = False
    description = "text embedding models: cosine, worst-5%, top-10 neighbours"

    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        return "cosine_similarity"

    def scores(self, outputs: np.ndarray, data: ArrayData, reference: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "cosine_similarity": fidelity_scores(outputs, reference)["cosine_similarity"],
            "top10_agreement": neighbour_agreement(outputs, reference),
        }

    def statistics(self) -> dict[str, tuple[str, Callable[[np.ndarray], float]]]:
        return {"worst5_cosine": ("cosine_similarity", worst_fraction_mean)}

    def check_model(self, loaded: Any, splits: Splits) -> None:
        """A text embedding model: a sentence-transformers / transformers directory that pools
        embeddings, or a factory / ONNX model fed token ids (a 2-D integer array, batch x sequence)."""
        text = getattr(loaded, "text", None)
        if text is not None:
            if text.kind != "embedding":
                raise InputError(
                    f"--task embedding needs an embedding model, but this directory holds a {text.kind}",
                    where=loaded.source,
                    fix="use --task classification (labels) or --task fidelity (label-free closeness to the"
                    " original model)",
                )
            return
        x = splits.calibration.x
        if x.ndim == 2 and np.issubdtype(x.dtype, np.integer):  # token ids: a text model given as arrays
            return
        raise InputError(
            "--task embedding measures a text embedding model on texts, but this model is given"
            " non-text inputs",
            where=f"{loaded.source} on {splits.source}",
            expected="a sentence-transformers / transformers model directory, or token ids"
            " (a 2-D integer array, batch x sequence)",
            found=f"a {loaded.kind} model on {x.dtype} inputs of shape {tuple(x.shape[1:])} per example",
            fix="use --task fidelity (label-free closeness to the original model's outputs) or --task"
            " classification (accuracy against labels)",
        )

    def check_outputs(self, splits: Splits, outputs: np.ndarray, where: str) -> None:
        _check_finite(splits, np.asarray(outputs), where)  # embeddings are no class scores: no label check


TASK = Embedding()
