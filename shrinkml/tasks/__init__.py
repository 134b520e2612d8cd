"""What "accuracy" means for a run. A task turns model outputs on the test split into per-example
scores (so every metric gets a bootstrap CI and the drop a paired one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError

TaskName = Literal["classification", "fidelity", "embedding"]
TASK_NAMES = ("classification", "fidelity", "embedding")
WORST_FRACTION = 0.05  # worst5_cosine: the mean of the lowest 5% of per-example cosines
NEIGHBOURS = 10  # top10_agreement
_SHOWN = 5  # offending label values named in an error


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


@dataclass(frozen=True)
class Task:
    """``classification``: top-1 accuracy against labels. ``fidelity``: label-free closeness of the
    compressed model's outputs to the original's (top-1 agreement for class scores, else cosine).
    ``embedding``: label-free fidelity of an embedding model to the original on the test texts:
    per-example cosine (primary: the budget's drop is ``1 - cosine``, paired against the original's
    exact 1.0), ``worst5_cosine`` (mean of the lowest 5% of cosines, CI by bootstrapping that
    statistic) and ``top10_agreement`` (overlap of each text's 10 nearest test neighbours)."""

    name: TaskName

    def primary_metric(self, outputs_shape: tuple[int, ...]) -> str:
        if self.name == "classification":
            return "accuracy"
        if self.name == "embedding":
            return "cosine_similarity"
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

    def check_model(self, loaded: Any, splits: Splits) -> None:
        """Refuse a model the task cannot mean (``loaded``: a ``shrinkml.models.LoadedModel``).

        ``embedding`` measures a text embedding model on texts: a sentence-transformers /
        transformers directory that pools embeddings, or a factory / ONNX model fed token ids
        (a 2-D integer array, batch x sequence). An image or feature model is refused, and so is
        ``classification`` on an embedding model directory (its outputs are no class scores)."""
        text = getattr(loaded, "text", None)
        if self.name == "classification" and text is not None and text.kind == "embedding":
            raise InputError(
                "--task classification needs class scores, but this directory holds an embedding model",
                where=loaded.source,
                fix="use --task embedding (closeness of the embeddings to the original model's) for an"
                " embedding model, or pass a *ForSequenceClassification model directory",
            )
        if self.name != "embedding":
            return
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
        """Refuse outputs the task cannot score, seen on one batch before any work: ``outputs`` is the
        model's output array on an example batch, ``where`` names the model for the message.

        Wherever accuracy is computed (``classification``; ``fidelity`` with labels), the outputs must
        be class scores ``(batch, C)`` with ``C >= 2`` and every label of every split in ``[0, C)``:
        a label the model cannot predict scores 0 however good the model is."""
        outputs = np.asarray(outputs)
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
        scored_as_classes = outputs.ndim == 2 and outputs.shape[1] >= 2
        if self.name == "classification" and not scored_as_classes:
            raise InputError(
                "--task classification needs class scores from the model, one per class",
                where=f"{where} on {splits.source}",
                expected="outputs of shape (batch, classes) with at least 2 classes",
                found=f"outputs of shape {tuple(outputs.shape)}",
                fix="return one logit per class (2 for a binary classifier), or use --task fidelity to"
                " measure closeness to the original model without labels",
            )
        if self.name == "embedding" or not scored_as_classes:
            return
        n_classes = outputs.shape[1]
        for split, data in (("calibration", splits.calibration), ("fine-tune", splits.finetune), ("test", splits.test)):
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
                    " belongs to this model"
                    + ("" if self.name == "classification" else "; or drop y to measure without labels"),
                )

    def scores(
        self, outputs: np.ndarray, data: ArrayData, reference: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Per-example scores on ``data``; ``reference`` holds the original model's outputs."""
        scores: dict[str, np.ndarray] = {}
        if self.name == "embedding":
            fid = fidelity_scores(outputs, reference)
            return {
                "cosine_similarity": fid["cosine_similarity"],
                "top10_agreement": neighbour_agreement(outputs, reference),
            }
        if data.y is not None and outputs.ndim == 2 and outputs.shape[1] >= 2:  # labels: accuracy too
            scores["accuracy"] = (outputs.argmax(axis=1) == data.y).astype(np.float64)
        if self.name == "fidelity":
            scores.update(fidelity_scores(outputs, reference))
        return scores


    def statistics(self) -> dict[str, tuple[str, Callable[[np.ndarray], float]]]:
        """Metrics that are not means: ``name -> (per-example score they summarise, statistic)``;
        their CI bootstraps the statistic itself."""
        if self.name == "embedding":
            return {"worst5_cosine": ("cosine_similarity", worst_fraction_mean)}
        return {}


def get_task(name: str) -> Task:
    if name in TASK_NAMES:
        return Task(name)
    raise InputError(
        f"unknown task {name!r}",
        where="--task",
        expected=" or ".join(TASK_NAMES),
        fix="pass --task classification (needs labels), --task fidelity (label-free) or --task embedding"
        " (embedding models, label-free)",
    )
