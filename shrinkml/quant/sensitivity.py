"""Which layers cost accuracy when quantized, and the fewest to keep in float to meet a budget.

For each weight layer, the model is quantized with *only that layer* quantized; the output SQNR
(dB, against the float model) and the drop of the task's primary metric say how sensitive the
layer is. ``keep_float: auto`` then quantizes everything, and while the budget is not met, keeps
the next most sensitive layer in float.

Selection uses the validation split (else the fine-tune split, else calibration), never the test
split: the budget on the test split is checked afterwards, like for any recipe. A candidate meets
the budget when the upper end of the paired-bootstrap 95% CI of its drop is within it, the same
rule the report applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from shrinkml.budget import Budget
from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.runtimes.onnx_names import module_name, weight_nodes

MAX_SELECTION_EXAMPLES = 1000

Quantizer = Callable[[list[str]], onnx.ModelProto]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone: its output SQNR and the drop of the primary metric."""

    node: str
    layer: str
    op_type: str
    weight_elements: int
    output_sqnr_db: float
    metric_drop: float


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - approx.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(max(signal, np.finfo(np.float64).tiny) / noise)


def selection_data(ctx) -> tuple[ArrayData, str]:
    """Data for choosing layers: the validation split, else fine-tune, else calibration; never test."""
    for name in ("validation", "finetune", "calibration"):
        data = getattr(ctx.splits, name)
        if data is not None and len(data) > 0:
            n = min(len(data), MAX_SELECTION_EXAMPLES)
            return data.subset(np.arange(n)), name
    raise InputError(
        "keep_float: auto has no data to choose layers on",
        where="keep_float",
        expected="examples in the validation, fine-tune or calibration split",
        fix="give more data, or list the layers to keep in float",
    )


class Evaluator:
    """Runs candidate models on the selection data and scores them against the float model."""

    def __init__(self, float_model: onnx.ModelProto, data: ArrayData, task, threads: int, seed: int) -> None:
        self.data, self.task, self.threads, self.seed = data, task, threads, seed
        self.reference = self.outputs(float_model)
        self.primary = task.primary_metric(self.reference.shape)
        self.base_scores = task.scores(self.reference, data, self.reference)[self.primary]

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        from shrinkml.runtimes.onnxruntime import OrtRunner

        runner = OrtRunner(model.SerializeToString(), threads=self.threads)
        return np.concatenate([runner.run(x) for x, _ in self.data.batches(256)])

    def drop(self, outputs: np.ndarray) -> tuple[float, float]:
        """Point drop and the upper end of its paired-bootstrap 95% CI."""
        from shrinkml.measure.stats import paired_bootstrap_diff_ci

        scores = self.task.scores(outputs, self.data, self.reference)[self.primary]
        value, _, hi = paired_bootstrap_diff_ci(self.base_scores, scores, n_resamples=1000, seed=self.seed)
        return value, hi


def layer_sensitivity(float_model: onnx.ModelProto, quantize: Quantizer, evaluator: Evaluator) -> list[LayerSensitivity]:
    """Quantize one layer at a time (all others float) and measure output SQNR and metric drop."""
    nodes = weight_nodes(float_model)
    initializers = {t.name: t for t in float_model.graph.initializer}
    names = [n.name for n in nodes]
    rows = []
    for node in nodes:
        outputs = evaluator.outputs(quantize([n for n in names if n != node.name]))
        weight = next((initializers[i] for i in node.input[:2] if i in initializers), None)
        rows.append(
            LayerSensitivity(
                node=node.name,
                layer=module_name(node.name) or node.name,
                op_type=node.op_type,
                weight_elements=int(np.prod(weight.dims)) if weight is not None else 0,
                output_sqnr_db=sqnr_db(evaluator.reference, outputs),
                metric_drop=evaluator.drop(outputs)[0],
            )
        )
    return rows


def _allowed(budget: Budget, evaluator: Evaluator, worst_drop: float) -> bool:
    return budget.allows(worst_drop, float(np.mean(evaluator.base_scores)))


def choose_keep_float(
    float_model: onnx.ModelProto, quantize: Quantizer, ctx, *, where: str
) -> tuple[list[str], dict]:
    """The fewest layers to keep in float so the quantized model meets ``ctx.budget``.

    Returns the node names to keep in float and a summary with the per-layer sensitivity table.
    """
    budget = ctx.budget or Budget()
    data, split = selection_data(ctx)
    evaluator = Evaluator(float_model, data, ctx.task, ctx.threads, ctx.seed)
    ctx.progress.log(f"{where}: all layers quantized, checking the budget on the {split} split")
    value, worst = evaluator.drop(evaluator.outputs(quantize([])))
    trials = [{"kept_float": 0, "drop": value, "drop_ci95_upper": worst}]
    summary = {"selection_split": split, "selection_examples": len(data), "metric": evaluator.primary,
               "budget": budget.model_dump(), "trials": trials}
    if _allowed(budget, evaluator, worst):
        return [], {**summary, "kept_float": [], "sensitivity": []}

    ctx.progress.log(f"{where}: measuring each layer's sensitivity")
    rows = layer_sensitivity(float_model, quantize, evaluator)
    # most harmful first: larger metric drop, then lower SQNR
    order = sorted(rows, key=lambda r: (-r.metric_drop, r.output_sqnr_db))
    kept: list[str] = []
    met = False
    for row in order:
        kept.append(row.node)
        value, worst = evaluator.drop(evaluator.outputs(quantize(kept)))
        trials.append({"kept_float": len(kept), "drop": value, "drop_ci95_upper": worst})
        if _allowed(budget, evaluator, worst):
            met = True
            break
    summary.update(
        kept_float=[module_name(n) or n for n in kept],
        budget_met_on_selection=met,
        sensitivity=[asdict(r) | {"kept_float": r.node in kept} for r in rows],
    )
    return kept, summary
