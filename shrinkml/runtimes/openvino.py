"""OpenVINO on CPU (``pip install 'shrinkml[openvino]'``): measures the same ``.onnx`` files as
ONNX Runtime, read by OpenVINO's ONNX frontend and compiled for the CPU plugin, with pinned threads.

OpenVINO picks its own inference precision: bfloat16 on CPUs with AMX or AVX512-BF16, float32
elsewhere; INT8 QDQ graphs (``quantize.static``) run on its INT8 kernels. ``describe`` reports the
precision it chose, so the report says what was computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrinkml.errors import InputError

_INSTALL = "pip install 'shrinkml[openvino]'"


def _openvino():
    try:
        import openvino
    except ImportError:
        raise InputError(
            "--runtime openvino needs the openvino package", where="--runtime openvino",
            fix=f"install it with {_INSTALL}, or pick another --runtime",
        ) from None
    return openvino


def _reason(exc: Exception) -> str:
    """OpenVINO's message without its source-location lines ("Exception from src/...:132:",
    "Check 'false' failed at ..."), which come first and say nothing to a user: what is left names
    the cause (e.g. "No conversion rule found for operations: com.microsoft.Inverse")."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Exception from ", "Check '"))]
    return " ".join(kept or [line for line in lines if line][:1] or [type(exc).__name__])


def _cannot_run(exc: Exception, path: str | Path, action: str) -> InputError:
    return InputError(
        f"OpenVINO cannot {action} this model",
        where=f"{Path(path).name} on --runtime openvino",
        found=_reason(exc)[:300],
        fix="use --runtime onnxruntime (the default) for graphs with operators OpenVINO's ONNX frontend does not"
        " implement (some ONNX Runtime contrib operators, com.microsoft)",
    )


def read_model(path: str | Path):
    """The ONNX file converted by OpenVINO's ONNX frontend (no compilation): a graph with an
    operator it cannot convert is an input error here, before any step of a recipe runs."""
    ov = _openvino()
    try:
        return ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise _cannot_run(exc, path, "read") from None


def compile_model(path: str | Path, *, threads: int):
    """The ONNX file compiled for OpenVINO's CPU plugin: ``threads`` inference threads, one stream,
    latency hint (one request at a time, as every model is timed here)."""
    ov = _openvino()
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    try:
        return core.compile_model(str(path), "CPU", config)
    except RuntimeError as exc:
        raise _cannot_run(exc, path, "compile") from None


def _type_name(value) -> str:
    """``bf16`` / ``f32`` for an OpenVINO element type (its str() is ``<Type: 'bfloat16'>``)."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OvRunner:
    """One compiled model and infer request: ``run(x)`` feeds one batch (an array, or named feeds)
    by input name (``shrinkml.runtimes.feeds``) and returns the first output as numpy."""

    def __init__(self, path: str | Path, *, threads: int) -> None:
        from shrinkml.runtimes.feeds import file_spec

        self.compiled = compile_model(path, threads=threads)
        self.request = self.compiled.create_infer_request()
        self._output = self.compiled.outputs[0]
        self.inputs = []
        for port in self.compiled.inputs:
            element = port.get_element_type().to_dtype()
            self.inputs.append((port.get_any_name(), None if element is None else np.dtype(element)))
        self.spec = file_spec(path) if Path(path).suffix == ".onnx" else None

    def feeds(self, x) -> dict[str, np.ndarray]:
        from shrinkml.runtimes.feeds import feeds

        return {name: np.ascontiguousarray(value) for name, value in feeds(x, self.inputs, self.spec).items()}

    def run(self, x) -> np.ndarray:
        result = self.request.infer(self.feeds(x))
        return np.array(result[self._output], copy=True)  # the request reuses its output buffer


class OpenVinoRuntime:
    """OpenVINO, CPU plugin: measures the ``.onnx`` file (PyTorch states exported), stored dense
    (OpenVINO's ONNX frontend does not read sparse initializers)."""

    name = "openvino"
    accepts = frozenset({"torch", "onnx"})
    artifact_suffix = ".onnx"
    artifact_format = "ONNX"

    def prepare(self, state, label, *, example, workdir, threads, export_tolerance, opset=17):
        from shrinkml.artifacts import onnx_artifact

        _openvino()  # before any export: a missing install is an input error, found first
        artifact = onnx_artifact(state, label, self.name, example=example, workdir=workdir, threads=threads,
                                 tolerance=export_tolerance, opset=opset, sparse=False)
        read_model(artifact.path)  # the baseline is prepared before any step: unsupported operators fail now
        return artifact

    def runner(self, artifact, *, threads: int) -> OvRunner:
        return OvRunner(artifact.path, threads=threads)

    def peak_memory(self, artifact, batch, *, threads: int, workdir) -> int:
        from shrinkml.measure import memory

        import onnx

        from shrinkml.runtimes.feeds import model_feeds

        feeds = model_feeds(onnx.load(str(artifact.path), load_external_data=False), batch)
        return memory.peak_memory_openvino(artifact.path, feeds, threads=threads)

    def load_instruction(self, file_name: str) -> str:
        return f"openvino.Core().compile_model({file_name!r}, 'CPU')"

    def describe(self, runner: OvRunner) -> dict:
        ov = _openvino()
        compiled = runner.compiled
        return {"version": ov.__version__, "device": "CPU",
                # what OpenVINO chose: bf16 on CPUs with AMX / AVX512-BF16 unless told otherwise
                "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                "streams": int(compiled.get_property("NUM_STREAMS"))}


RUNTIME = OpenVinoRuntime()
