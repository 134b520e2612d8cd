"""PyTorch -> ONNX export, verified against PyTorch on the same input."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import torch

from shrinkml.errors import InputError

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _dynamic_input_axes(example: np.ndarray) -> dict[int, str]:
    """Batch is always dynamic; so is the sequence axis of token ids (integer ``(batch, seq)``)."""
    if np.issubdtype(example.dtype, np.integer) and example.ndim == 2:
        return {0: "batch", 1: "sequence"}
    return {0: "batch"}


@contextlib.contextmanager
def eager_attention(module: torch.nn.Module) -> Iterator[None]:
    """Hugging Face models inside ``module`` switched to their eager attention for the export.

    Their default SDPA attention exports as masked ``Where`` / ``IsNaN`` passes over every
    ``(batch, heads, seq, seq)`` score tensor; on all-MiniLM-L6-v2 at 32 x 128 tokens those took 30% of
    an INT8 model's ONNX Runtime time. The eager path adds the mask to the scores instead: the same
    function (checked against PyTorch after every export) and the graph ONNX Runtime's fusions expect.
    """
    switched = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        setter = getattr(sub, "set_attn_implementation", None)
        current = getattr(config, "_attn_implementation", None)
        if setter is None or current in (None, "eager"):  # submodels share the switched config
            continue
        try:
            setter("eager")
        except Exception:  # a model without an eager path keeps its own attention
            continue
        switched.append((sub, current))
    try:
        yield
    finally:
        for sub, previous in reversed(switched):
            sub.set_attn_implementation(previous)


def _export_io(module: torch.nn.Module, example: np.ndarray):
    """What ``torch.onnx.export`` is given: the module to trace, its example inputs, input and output
    names, dynamic axes and the input spec for the graph's metadata. A ``TextEncoder`` is exported in
    the Hugging Face layout (named ids / mask / token types in, named outputs); any other module as
    one input and one output."""
    from shrinkml.models.text import TextEncoder, TextExport
    from shrinkml.runtimes.feeds import feeds, text_spec

    if isinstance(module, TextEncoder):
        spec = text_spec(module.pad_token_id)
        names, outputs = module.input_names(), module.output_names()
        named = feeds(example, [(n, np.int64) for n in names], spec)
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
        axes.update({o: {0: "batch_size"} for o in outputs})
        if "last_hidden_state" in outputs:
            axes["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}
        return TextExport(module), tuple(torch.from_numpy(named[n]) for n in names), names, outputs, axes, spec
    axes = {INPUT_NAME: _dynamic_input_axes(example), OUTPUT_NAME: {0: "batch"}}
    return module, (torch.as_tensor(example),), [INPUT_NAME], [OUTPUT_NAME], axes, None


def export_onnx(module: torch.nn.Module, example: np.ndarray, *, opset: int = 17) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) with a dynamic batch axis (and sequence axis for token ids).

    Uses the TorchScript exporter: it is ~30x faster than the dynamo exporter on small models and
    produces the plain Conv/Gemm/MatMul graphs that ONNX Runtime's quantizers expect.
    """
    from shrinkml.runtimes.feeds import set_onnx_spec

    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        traced, args, input_names, output_names, axes, spec = _export_io(module, example)
        with warnings.catch_warnings(), eager_attention(module):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                traced,
                args,
                buffer,
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise InputError(
            f"the model could not be exported to ONNX ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            where="export",
            fix="use --runtime torch, or make the model exportable (torch.onnx.export must succeed)",
        ) from exc
    finally:
        module.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    set_onnx_spec(model, spec)
    return model


def max_abs_diff_vs_torch(
    module: torch.nn.Module, model: onnx.ModelProto | bytes, example: np.ndarray, *, threads: int
) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's outputs on ``example``."""
    from shrinkml.runtimes.onnxruntime import OrtRunner

    was_training = module.training
    module.eval()
    with torch.inference_mode():
        expected = module(torch.as_tensor(example)).float().numpy()
    module.train(was_training)
    payload = model if isinstance(model, bytes) else model.SerializeToString()
    got = OrtRunner(payload, threads=threads).run(example)
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))


def export_verified(
    module: torch.nn.Module,
    example: np.ndarray,
    *,
    tolerance: float,
    threads: int,
    opset: int = 17,
    label: str = "model",
) -> tuple[onnx.ModelProto, float]:
    """Export and check ONNX Runtime reproduces PyTorch within ``tolerance`` (max abs difference)."""
    model = export_onnx(module, example, opset=opset)
    diff = max_abs_diff_vs_torch(module, model, example, threads=threads)
    if not np.isfinite(diff) or diff > tolerance:
        raise InputError(
            f"the ONNX export of the {label} does not match PyTorch",
            where="export",
            expected=f"max abs difference <= {tolerance:g}",
            found=f"{diff:.3g}",
            fix="check for ops that export differently (custom autograd functions, data-dependent control"
            " flow), raise --export-tolerance if the difference is acceptable, or use --runtime torch",
        )
    return model, diff


def state_to_onnx(
    state, *, example: np.ndarray, tolerance: float, threads: int, opset: int = 17, label: str = "model",
    module: torch.nn.Module | None = None,
) -> tuple[onnx.ModelProto, float | None]:
    """The one float ONNX of a model state (``shrinkml.core.types.ModelState``): an ONNX state as
    it is (with the difference its own export recorded), a PyTorch state exported and verified.
    ``module``: a transformed copy of the state's model to export instead (e.g. SmoothQuant's)."""
    if state.kind == "onnx" and module is None:
        return state.onnx_model, state.export_max_abs_diff
    return export_verified(module if module is not None else state.torch_model, example, tolerance=tolerance,
                           threads=threads, opset=opset, label=label)


def float_onnx(state, ctx, *, module: torch.nn.Module | None = None) -> tuple[onnx.ModelProto, dict]:
    """``state_to_onnx`` with a step's context, and the export check for the step's summary (empty
    for an ONNX state, which no export of this step produced)."""
    model, diff = state_to_onnx(state, example=ctx.example_input, tolerance=ctx.export_tolerance,
                                threads=ctx.threads, opset=ctx.opset, module=module)
    if state.kind == "onnx" and module is None:
        return model, {}
    return model, {"export_max_abs_diff": diff, "export_tolerance": ctx.export_tolerance}
