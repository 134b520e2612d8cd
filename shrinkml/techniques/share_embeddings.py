"""``share.embeddings``: weight sharing for embedding tables by product quantization.

Each row of an embedding table (``Gather`` from a float ``(rows, width)`` initializer) is cut into
``width / vector_size`` short vectors; the vectors at the same position of every row share one
codebook of ``codebook_size`` (at most 256) entries, learned by k-means, and each row stores one
uint8 code per position. With ``vector_size: 3`` a float32 table takes 8/3 bits per weight plus its
codebooks (all-MiniLM-L6-v2's 30,522 x 384 word embeddings: 46.9 MB -> 4.3 MB), and unlike uniform
3-bit codes the shared vectors follow the table's joint distribution.

The deployed graph uses standard ONNX ops only: the codes are gathered like the table was, offset
into the flat codebook and gathered again (``Gather -> Cast -> Add -> Gather -> Reshape``), so it
runs on any ONNX runtime and the file holds just codes and codebooks. Lookups touch only the
gathered tokens, so the cost at inference is a few small elementwise ops.

The step checks what it deploys: ONNX Runtime's output on the example input is compared with the
graph before the step (``max_abs_diff_vs_before``), and each table's reconstruction SQNR is
reported. Tables narrower than ``min_rows`` rows (e.g. BERT's 2-row token-type table) stay float.

Recipe step::

    - technique: share.embeddings
      vector_size: 3        # weights per shared vector: 8 / vector_size bits per weight
      codebook_size: 256
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register, searchable
from shrinkml.techniques.quantize_dynamic import float_onnx

if TYPE_CHECKING:
    import onnx

WHERE = "share.embeddings"
_DISTANCE_BUDGET = 64 * 2**20  # float32 distances held at once during k-means (256 MiB)


class ShareEmbeddingsConfig(StepConfig):
    """Product-quantized embedding tables: shared codebooks of short vectors, uint8 codes per row."""

    technique: Literal["share.embeddings"] = Field(
        "share.embeddings", description="the technique this step runs (`shrinkml techniques` lists them)"
    )
    vector_size: int = Field(3, ge=1, le=16, description="weights per shared vector (8/vector_size bits per weight)",
                             json_schema_extra=searchable(choices=(2, 3, 4)))
    codebook_size: int = Field(256, ge=2, le=256, description="shared vectors per position (codes are uint8)")
    iterations: int = Field(25, ge=1, le=500, description="k-means (Lloyd) iterations per codebook")
    min_rows: int = Field(256, ge=2, description="tables with fewer rows stay float")
    tables: tuple[str, ...] = Field(
        (), description="initializer names of the tables to share (default: every float Gather table >= min_rows)"
    )


# --- k-means -------------------------------------------------------------------------------------


def product_quantize(
    table: np.ndarray, vector_size: int, codebook_size: int, iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(codes (rows, m) uint8, codebooks (m, k, vector_size) float32)`` with
    ``m = width / vector_size`` and ``k = min(codebook_size, rows)``, by seeded k-means per position."""
    import torch

    rows, width = table.shape
    m, k = width // vector_size, min(codebook_size, rows)
    x = torch.from_numpy(np.array(table, dtype=np.float32)).reshape(rows, m, vector_size)
    x = x.permute(1, 0, 2).contiguous()  # (m, rows, d)
    generator = torch.Generator().manual_seed(seed)
    codebooks = torch.empty(m, k, vector_size)
    codes = torch.empty(m, rows, dtype=torch.int64)
    chunk = max(1, _DISTANCE_BUDGET // (rows * k))
    for start in range(0, m, chunk):
        part = x[start : start + chunk]
        # init: k distinct rows, the same sample for every position in the chunk
        centres = part[:, torch.randperm(rows, generator=generator)[:k]].clone()
        for _ in range(iterations):
            assign = torch.cdist(part, centres).argmin(-1)  # (c, rows)
            sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, vector_size), part)
            counts = torch.zeros(part.shape[0], k).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
            # an empty cluster keeps its centre
            centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
        codebooks[start : start + chunk] = centres
        codes[start : start + chunk] = torch.cdist(part, centres).argmin(-1)
    return codes.T.contiguous().to(torch.uint8).numpy(), codebooks.numpy()


def reconstruct(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """The ``(rows, width)`` table the codes stand for."""
    m, _, d = codebooks.shape
    return codebooks[np.arange(m)[None, :], codes.astype(np.int64)].reshape(codes.shape[0], m * d)


def _sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


# --- graph ---------------------------------------------------------------------------------------


def _tables(model: onnx.ModelProto, config: ShareEmbeddingsConfig) -> dict[str, list[onnx.NodeProto]]:
    """Float rank-2 initializers read by ``Gather`` (axis 0) and by nothing else, with their Gathers."""
    import onnx
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    found = {}
    for name, nodes in readers.items():
        t = inits[name]
        if t.data_type not in floats or len(t.dims) != 2:
            continue
        gathers = all(
            n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.input[0] == name
            and next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0) == 0
            for n in nodes
        )
        if gathers:
            found[name] = nodes
    if config.tables:
        missing = [t for t in config.tables if t not in found]
        if missing:
            raise InputError(
                f"no embedding table named {missing[0]!r}",
                where=f"{WHERE}.tables",
                expected="initializer names of float tables read only by Gather",
                found=", ".join(sorted(found)) or "no such tables in the model",
                fix="use one of the names found, or leave tables empty to share every large table",
            )
        return {name: found[name] for name in config.tables}
    return {name: nodes for name, nodes in found.items()
            if inits[name].dims[0] >= config.min_rows and _saves_bytes(inits[name], config)}


def _saves_bytes(table: onnx.TensorProto, config: ShareEmbeddingsConfig) -> bool:
    from onnx import helper

    rows, width = table.dims
    itemsize = helper.tensor_dtype_to_np_dtype(table.data_type).itemsize
    m, k = width // config.vector_size, min(config.codebook_size, rows)
    return rows * m + m * k * config.vector_size * itemsize < rows * width * itemsize


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    import onnx

    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _rewrite(model: onnx.ModelProto, name: str, gathers: list[onnx.NodeProto], codes: np.ndarray,
             codebooks: np.ndarray, dtype: int) -> None:
    import onnx
    from onnx import helper, numpy_helper

    from shrinkml.measure.params import SHARED_CODEBOOK, SHARED_CODES, SHARED_OFFSETS

    m, k, d = codebooks.shape
    graph = model.graph
    prefix = name.replace("/", "_")
    graph.initializer.extend([
        numpy_helper.from_array(codes, prefix + SHARED_CODES),
        numpy_helper.from_array(codebooks.reshape(m * k, d).astype(helper.tensor_dtype_to_np_dtype(dtype)),
                                prefix + SHARED_CODEBOOK),
        numpy_helper.from_array(np.arange(m, dtype=np.int64) * k, prefix + SHARED_OFFSETS),
        numpy_helper.from_array(np.array([m * d], dtype=np.int64), f"{prefix}.shared_width"),
    ])
    replaced = {g.output[0] for g in gathers}  # outputs are unique in a graph (SSA)
    nodes = [copy_node(n) for n in graph.node]
    del graph.node[:]
    for node in nodes:
        if node.output[0] not in replaced:
            graph.node.append(node)
            continue
        base, indices, out = node.name or f"{prefix}_gather", node.input[1], node.output[0]
        graph.node.extend([
            helper.make_node("Gather", [prefix + SHARED_CODES, indices], [f"{base}/codes"], name=f"{base}/codes", axis=0),
            helper.make_node("Cast", [f"{base}/codes"], [f"{base}/codes64"], name=f"{base}/cast", to=onnx.TensorProto.INT64),
            helper.make_node("Add", [f"{base}/codes64", prefix + SHARED_OFFSETS], [f"{base}/flat"], name=f"{base}/offset"),
            helper.make_node("Gather", [prefix + SHARED_CODEBOOK, f"{base}/flat"], [f"{base}/vectors"],
                             name=f"{base}/vectors", axis=0),
            helper.make_node("Shape", [indices], [f"{base}/index_shape"], name=f"{base}/index_shape"),
            helper.make_node("Concat", [f"{base}/index_shape", f"{prefix}.shared_width"], [f"{base}/shape"],
                             name=f"{base}/shape", axis=0),
            helper.make_node("Reshape", [f"{base}/vectors", f"{base}/shape"], [out], name=base),
        ])
    kept = [t for t in graph.initializer if t.name != name]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _run(model: onnx.ModelProto, x: np.ndarray, threads: int) -> np.ndarray:
    from shrinkml.runtimes.onnxruntime import OrtRunner

    return OrtRunner(model.SerializeToString(), threads=threads).run(x)


def _has_embeddings(loaded) -> str | None:
    """A search's check: the model must have an embedding table of at least ``min_rows`` rows."""
    min_rows = ShareEmbeddingsConfig().min_rows
    if loaded.kind == "torch":
        from torch import nn

        if any(isinstance(m, nn.Embedding) and m.num_embeddings >= min_rows for m in loaded.module.modules()):
            return None
    elif any(n.op_type == "Gather" for n in loaded.onnx_model.graph.node):
        return None
    return f"no embedding table of at least {min_rows} rows"


@register("share.embeddings", ShareEmbeddingsConfig, accepts=("torch", "onnx"), produces="onnx",
          stage="finish", applies=_has_embeddings)
def apply(state: ModelState, config: ShareEmbeddingsConfig, ctx: StepContext) -> StepResult:
    import onnx
    from onnx import numpy_helper

    before, summary = float_onnx(state, ctx)
    model = onnx.ModelProto()
    model.CopyFrom(before)
    tables = _tables(model, config)
    if not tables:
        raise InputError(
            "share.embeddings found no embedding table to share",
            where=WHERE,
            expected=f"a float (rows, width) initializer read only by Gather, with at least {config.min_rows} rows",
            found="none (tables may already be quantized, e.g. by quantize.weight_only with quantize_embeddings)",
            fix="lower min_rows, or put share.embeddings before steps that quantize the embedding tables",
        )
    inits = {t.name: t for t in model.graph.initializer}
    for name in sorted(tables):  # every table checked before any k-means runs
        rows, width = inits[name].dims
        if width % config.vector_size:
            raise InputError(
                f"embedding table {name!r} has width {width}, not a multiple of vector_size {config.vector_size}",
                where=f"{WHERE}.vector_size",
                expected="a vector_size dividing every shared table's width",
                found=f"{name}: {rows} x {width}",
                fix=f"use a divisor of {width} (e.g. {next(v for v in (4, 3, 2, 1) if width % v == 0)})",
            )
    details = []
    for index, (name, gathers) in enumerate(sorted(tables.items())):
        table = numpy_helper.to_array(inits[name])
        rows, width = table.shape
        ctx.progress.log(f"{WHERE}: k-means for {name} ({rows} x {width}, {width // config.vector_size} codebooks)")
        codes, codebooks = product_quantize(table, config.vector_size, config.codebook_size, config.iterations,
                                            seed=ctx.seed + index)
        stored = codes.nbytes + codebooks.nbytes
        details.append({
            "table": name, "shape": [rows, width], "codebooks": int(codebooks.shape[0]),
            "codebook_size": int(codebooks.shape[1]), "bytes_before": int(table.nbytes), "bytes_after": int(stored),
            "bits_per_weight": 8 * stored / table.size,
            "sqnr_db": _sqnr_db(table, reconstruct(codes, codebooks)),
        })
        _rewrite(model, name, gathers, codes, codebooks, inits[name].data_type)
    x = np.asarray(ctx.example_input)
    try:
        got, expected = _run(model, x, ctx.threads), _run(before, x, ctx.threads)
    except Exception as exc:  # ORT raises its own types
        raise InputError(
            f"ONNX Runtime cannot run the model with shared embeddings ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            where=WHERE,
            fix="name the tables to share explicitly with tables: [...], or remove share.embeddings",
        ) from exc
    summary.update({"tables": details, "max_abs_diff_vs_before": float(np.max(np.abs(got - expected)))})
    return StepResult(
        ModelState("onnx", onnx_model=model, sparse_params=state.sparse_params,
                   export_max_abs_diff=summary.get("export_max_abs_diff", state.export_max_abs_diff)),
        summary,
    )
