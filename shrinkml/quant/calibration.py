"""Calibration for static quantization: the examples, the activation ranges, and the checks that
keep a bad calibration from turning into a silently wrong scale.

ONNX Runtime's calibrators (min-max, percentile, entropy) pick each tensor's range; ``mse`` is
ours: the clipping range that minimises the mean squared error between an activation and its
fake-quantized copy, searched over a grid of ranges. Every method yields the same thing, a
``TensorsData`` of ``(lowest, highest)`` per tensor, which ONNX Runtime's quantizer then uses.

Before any range is computed, one pass over the calibration data checks that every tensor that
will be calibrated is finite: ONNX Runtime's min-max calibrator uses ``nanmin``/``nanmax`` and
would otherwise quietly ignore NaNs.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx

from shrinkml.data import ArrayData
from shrinkml.errors import InputError
from shrinkml.runtimes.feeds import feeds, onnx_inputs, onnx_spec
from shrinkml.runtimes.onnx_names import WEIGHT_OPS
from shrinkml.quant.numerics import fake_quantize

if TYPE_CHECKING:
    from onnxruntime.quantization import TensorsData

CalibrationName = Literal["minmax", "percentile", "entropy", "mse"]

# Values kept per tensor for the MSE search (a seeded random subset plus each batch's extremes):
# 256k float32 values are 1 MiB per tensor and give the MSE to well under 1% relative error.
MSE_SAMPLES_PER_TENSOR = 1 << 18
# Candidate clipping ranges for MSE: the calibrated [min, max] scaled by these factors.
MSE_GRID = np.geomspace(1.0, 0.01, 100)
BATCH_SIZE = 32


class ArrayReader:
    """ONNX Runtime ``CalibrationDataReader`` over a numpy array (duck-typed: ORT only calls
    ``get_next``), in batches of ``batch_size``, each turned into ``model``'s named feeds
    (``shrinkml.runtimes.feeds``); ``rewind()`` starts over."""

    def __init__(self, x: np.ndarray, model: onnx.ModelProto, batch_size: int) -> None:
        self.x, self.batch_size = x, batch_size
        self.inputs, self.spec = onnx_inputs(model), onnx_spec(model)
        self._start, self._stop, self._pos = 0, len(x), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._stop:
            return None
        batch = self.x[self._pos : min(self._pos + self.batch_size, self._stop)]
        self._pos += self.batch_size
        return feeds(batch, self.inputs, self.spec)

    def rewind(self) -> None:
        self._pos = self._start

    def __len__(self) -> int:
        return len(self.x)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._stop, self._pos = start_index, min(end_index, len(self.x)), start_index


def calibration_inputs(data: ArrayData, *, max_examples: int, where: str) -> np.ndarray:
    """The first ``max_examples`` calibration inputs as float32; an empty split or a non-finite
    input is an error, never a default scale."""
    if len(data) == 0:
        raise InputError(
            "the calibration split is empty, so no activation range can be measured",
            where=where,
            expected="at least 1 calibration example (a few hundred is typical)",
            found="0 examples",
            fix="give more data or a larger calibration fraction, or use quantize.dynamic, which needs no calibration",
        )
    x = np.ascontiguousarray(data.x[:max_examples])
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise InputError(
                "the model input has non-finite values (NaN or inf) during calibration",
                where=where,
                expected="finite calibration inputs",
                found=f"{len(bad)} of {len(x)} examples with NaN/inf (first: example {int(bad[0])})",
                fix="clean or drop those examples from the calibration data",
            )
    return x


def batch_size_for(model: onnx.ModelProto) -> int:
    """Calibrate in batches of 32 unless the model's first input has a fixed batch size."""
    dim0 = model.graph.input[0].type.tensor_type.shape.dim
    if dim0 and dim0[0].HasField("dim_value") and dim0[0].dim_value > 0:
        return dim0[0].dim_value
    return BATCH_SIZE


def default_op_types() -> list[str]:
    """The op types ONNX Runtime's static quantizer handles when none are given."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def tensors_to_calibrate(model: onnx.ModelProto, op_types: list[str]) -> list[str]:
    """The tensors ONNX Runtime's calibrator measures (float inputs and outputs of nodes of
    ``op_types`` that are not initializers), in graph order. ``model`` must carry shape
    information (``onnx.shape_inference`` or ``quant_pre_process``)."""
    value_infos = {vi.name: vi for vi in model.graph.value_info}
    value_infos.update({vi.name: vi for vi in model.graph.output})
    value_infos.update({vi.name: vi for vi in model.graph.input})
    initializers = {t.name for t in model.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    wanted = set(op_types)
    names: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in wanted:
            continue
        for name in [*node.input, *node.output]:
            vi = value_infos.get(name)
            if (
                vi is not None
                and name not in initializers
                and vi.type.HasField("tensor_type")
                and vi.type.tensor_type.elem_type in float_types
            ):
                names[name] = None
    return list(names)


def _session(model: onnx.ModelProto | str, threads: int):
    from shrinkml.runtimes.onnxruntime import session

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    # no graph optimization: fusions could remove the intermediate tensors being measured
    return session(source, threads=threads, optimization="ORT_DISABLE_ALL")


@dataclass
class ActivationScan:
    """What one pass over the calibration data saw, per tensor."""

    lowest: dict[str, float] = field(default_factory=dict)
    highest: dict[str, float] = field(default_factory=dict)
    # (values, weights) per batch: a weighted subsample that stands for all of the batch's values
    samples: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    # tensors holding mask fills by design (attention masks filled with -inf or float32's lowest value
    # before a Softmax): no useful quantization range exists for them, so the nodes around them stay float
    infinite: set[str] = field(default_factory=set)


# Attention masks fill with -inf (SDPA) or with the dtype's lowest value (eager attention, -3.4e38 in
# float32); no activation a layer computes comes near 1e30, and a range stretched to it would leave a
# single INT8 step for all real values.
MASK_FILL_MAGNITUDE = 1e30


def _has_mask_fill(values: np.ndarray) -> bool:
    return bool(values.size) and np.issubdtype(values.dtype, np.floating) and bool(
        (np.abs(values) >= MASK_FILL_MAGNITUDE).any()
    )


def _subsample(arr: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """At most ``size`` values of ``arr`` with weights summing to about ``arr.size``: the minimum
    and the maximum (weight 1: the MSE search must see the extremes it would clip) and a uniform
    random subset, each value standing for ``arr.size / (size - 2)`` values."""
    if arr.size <= size:
        return arr.astype(np.float32, copy=True), np.ones(arr.size)
    chosen = rng.choice(arr.size, size - 2, replace=False)  # numpy samples without a full permutation
    values = np.concatenate([[arr.min(), arr.max()], arr[chosen]]).astype(np.float32)
    weights = np.concatenate([[1.0, 1.0], np.full(size - 2, arr.size / (size - 2))])
    return values, weights


def scan_activations(
    model: onnx.ModelProto,
    tensors: list[str],
    reader: ArrayReader,
    *,
    threads: int,
    keep_samples: bool,
    seed: int,
    where: str,
) -> ActivationScan:
    """Run the calibration data once with ``tensors`` exposed as outputs; raise if any of them has
    a NaN or inf (naming the first such tensor in graph order); keep min/max and, for MSE, a
    bounded, seeded sample of each tensor's values."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    value_infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    for name in tensors:
        if name not in existing:
            augmented.graph.output.append(value_infos[name])
    session = _session(augmented, threads)
    output_names = [o.name for o in session.get_outputs()]
    n_batches = max(1, -(-len(reader) // reader.batch_size))
    per_batch = max(1, MSE_SAMPLES_PER_TENSOR // n_batches)
    rng = np.random.default_rng(seed)
    scan = ActivationScan()
    order = {name: i for i, name in enumerate(tensors)}
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    reader.rewind()
    seen = 0
    while (feed := reader.get_next()) is not None:
        values = dict(zip(output_names, session.run(output_names, feed)))
        # NaN is never by design, nor is +-inf computed by a layer (an overflow); +-inf from masking
        # ops (Where, then Add/Softmax) is, and is handled by keeping those nodes float. The first
        # bad tensor in graph order is the root cause (an overflow upstream turns into NaN later).
        bad = [
            name for name in tensors
            if np.isnan(values[name]).any() or (producers.get(name) in WEIGHT_OPS and np.isinf(values[name]).any())
        ]
        if bad:
            first = min(bad, key=order.__getitem__)
            batch = len(next(iter(feed.values())))
            raise InputError(
                f"{first} has non-finite values during calibration",
                where=where,
                expected="finite activations for every calibration example",
                found=f"NaN/inf in {first} (and {len(bad) - 1} other tensors) for calibration examples"
                f" {seen}..{seen + batch - 1}",
                fix="check the model and the calibration data (overflowing layers, division by zero, bad"
                " inputs), or keep the layer in float with keep_float",
            )
        seen += len(next(iter(feed.values())))
        scan.infinite.update(name for name in tensors if _has_mask_fill(values[name]))
        for name in tensors:
            arr = values[name].reshape(-1)
            if arr.size == 0 or name in scan.infinite:
                continue
            lo, hi = float(arr.min()), float(arr.max())
            scan.lowest[name] = min(lo, scan.lowest.get(name, lo))
            scan.highest[name] = max(hi, scan.highest.get(name, hi))
            if keep_samples:
                scan.samples.setdefault(name, []).append(_subsample(arr, per_batch, rng))
    if seen == 0:
        raise InputError("no calibration data reached the model", where=where, fix="give calibration examples")
    return scan


def mse_range(
    values: np.ndarray, *, symmetric: bool, signed: bool, bits: int = 8, weights: np.ndarray | None = None
) -> tuple[float, float, float]:
    """The clipping range ``[lo, hi]`` (the min-max range scaled by a factor from ``MSE_GRID``)
    whose fake-quantized values are closest to ``values`` in (weighted) mean squared error; also
    that factor. Ties go to the widest range (the grid starts at the full min-max range).

    At 8 bits a range is clipped only when the extremes are rare: clipping one value of size V
    costs about V^2, while the finer step saves about (V/255)^2/12 on each of N values, so a lone
    outlier is clipped only among ~800k values or more.
    """
    lo0, hi0 = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if lo0 == hi0:
        return lo0, hi0, 1.0
    values = values.astype(np.float32, copy=False)
    w = np.ones(values.size) if weights is None else np.asarray(weights, dtype=np.float64)
    errors = []
    for t in MSE_GRID:
        approx = fake_quantize(values, t * lo0, t * hi0, bits=bits, symmetric=symmetric, signed=signed)
        diff = (approx - values).astype(np.float64)
        errors.append(float(np.dot(w, diff * diff)))
    best = int(np.argmin(errors))
    t = float(MSE_GRID[best])
    return t * lo0, t * hi0, t


def _tensors_data(method, ranges: dict[str, tuple[float, float]]) -> TensorsData:
    from onnxruntime.quantization import TensorsData

    return TensorsData(
        method, {k: (np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32)) for k, (lo, hi) in ranges.items()}
    )


@dataclass(frozen=True)
class CalibrationResult:
    """Per-tensor ``(lowest, highest)`` ranges, as ONNX Runtime's quantizer takes them."""

    ranges: dict[str, tuple[float, float]]
    examples: int
    clipped_tensors: int  # tensors whose range is narrower than their min-max range
    infinite_tensors: tuple[str, ...] = ()  # hold +-inf (e.g. attention masks): no range, keep float

    def to_tensors_data(self) -> TensorsData:
        from onnxruntime.quantization import CalibrationMethod

        return _tensors_data(CalibrationMethod.MinMax, self.ranges)


@dataclass(frozen=True)
class CalibrationSpec:
    """How activation ranges are chosen, and the integer type they will be quantized to."""

    method: CalibrationName = "minmax"
    percentile: float = 99.99  # for method "percentile"
    symmetric: bool = False  # activation ranges centered on 0
    signed: bool = False  # int8 (else uint8) activations


def calibrate(
    model_path: Path,
    x: np.ndarray,
    spec: CalibrationSpec,
    *,
    op_types: list[str],
    threads: int,
    seed: int,
    workdir: Path,
    where: str,
) -> CalibrationResult:
    """Activation ranges of the (pre-processed) float ONNX model at ``model_path``, measured on
    the calibration inputs ``x``, for the tensors ONNX Runtime quantizes with ``op_types``.

    >>> result = calibrate(path, x, CalibrationSpec("mse"), op_types=default_op_types(), ...)  # doctest: +SKIP
    >>> result.ranges["/0/Conv_output_0"]  # doctest: +SKIP
    (-1.7, 2.3)
    """
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    tensors = tensors_to_calibrate(model, op_types)
    if not tensors:
        raise InputError(
            "found nothing to quantize: the model has none of the op types to quantize",
            where=where,
            expected="the model to contain one of " + ", ".join(op_types[:12]) + (" ..." if len(op_types) > 12 else ""),
            found="op types " + ", ".join(sorted({n.op_type for n in model.graph.node})),
            fix="add the model's op types to op_types, or leave op_types unset",
        )
    reader = ArrayReader(x, model, batch_size_for(model))
    scan = scan_activations(
        model, tensors, reader, threads=threads, keep_samples=spec.method == "mse", seed=seed, where=where
    )
    minmax = {name: (scan.lowest[name], scan.highest[name]) for name in tensors if name in scan.lowest}
    if spec.method == "mse":
        ranges = {}
        clipped = 0
        for name in minmax:
            values, weights = (np.concatenate(parts) for parts in zip(*scan.samples[name]))
            lo, hi, t = mse_range(values, weights=weights, symmetric=spec.symmetric, signed=spec.signed)
            ranges[name] = (lo, hi)
            clipped += t < 1.0
        return CalibrationResult(ranges, len(x), clipped, tuple(sorted(scan.infinite)))
    if spec.method in ("percentile", "entropy") and reader.batch_size == BATCH_SIZE:
        # ORT's histogram calibrators stack every batch's outputs with np.asarray, which fails when
        # the last batch is shorter; they keep all outputs in memory anyway, so use one batch.
        reader = ArrayReader(x, model, len(x))
    ranges = _ort_ranges(model_path, reader, spec.method, op_types, spec.percentile, threads, workdir)
    ranges = {name: r for name, r in ranges.items() if name not in scan.infinite}
    clipped = sum(
        1 for name, (lo, hi) in ranges.items()
        if name in minmax and (lo > min(minmax[name][0], 0.0) or hi < max(minmax[name][1], 0.0))
    )
    return CalibrationResult(ranges, len(x), clipped, tuple(sorted(scan.infinite)))


def _ort_ranges(model_path, reader, method, op_types, percentile, threads, workdir) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    ort_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra = {"percentile": percentile} if method == "percentile" else {}
    calibrator = create_calibrator(
        Path(model_path), op_types, augmented_model_path=str(workdir / "calibration.augmented.onnx"),
        calibrate_method=ort_method, extra_options=extra,
    )
    calibrator.infer_session = _session(calibrator.augmented_model_path, threads)  # pin threads
    reader.rewind()
    # ORT's histogram calibrators print progress to stdout; keep stdout clean for --json users
    with contextlib.redirect_stdout(io.StringIO()):
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    return {name: (_scalar(td.range_value[0]), _scalar(td.range_value[1])) for name, td in data.items()}


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
