"""ONNX Runtime on CPU with pinned threads: one session builder (``session``) for every use."""

from __future__ import annotations

from pathlib import Path

import numpy as np


_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def session(
    model: str | Path | bytes, *, threads: int, optimization: str = "ORT_ENABLE_ALL",
    optimized_path: str | Path | None = None,
):
    """The one way shrinkml opens an ONNX Runtime CPU session: ``threads`` intra-op threads, one
    inter-op thread, sequential execution, thread spinning off, errors-only logging.

    ``optimization`` is a ``GraphOptimizationLevel`` name (``ORT_DISABLE_ALL`` where intermediate
    tensors must survive, e.g. calibration); ``optimized_path`` saves the graph ORT will run.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    options.log_severity_level = 3
    # Idle sessions' spinning worker threads would steal the cores from the session being
    # timed when several are interleaved (baseline and compressed); the same for all models.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OrtRunner:
    """One ONNX Runtime session: ``run(x)`` feeds one batch (an array, or named feeds) by name
    (``shrinkml.runtimes.feeds``) and returns the first output as numpy."""

    def __init__(self, model: str | Path | bytes, *, threads: int) -> None:
        from shrinkml.runtimes.feeds import spec_from_metadata

        self.session = session(model, threads=threads)
        self.inputs = [(i.name, _DTYPES.get(i.type)) for i in self.session.get_inputs()]
        self.input_name = self.inputs[0][0]
        self.spec = spec_from_metadata(self.session.get_modelmeta().custom_metadata_map)

    def feeds(self, x) -> dict[str, np.ndarray]:
        from shrinkml.runtimes.feeds import feeds

        return feeds(x, self.inputs, self.spec)

    def run(self, x) -> np.ndarray:
        return self.session.run(None, self.feeds(x))[0]


class OnnxRuntime:
    """ONNX Runtime, CPU execution provider: measures the ``.onnx`` file (PyTorch states exported)."""

    name = "onnxruntime"
    accepts = frozenset({"torch", "onnx"})
    artifact_suffix = ".onnx"
    artifact_format = "ONNX"

    def prepare(self, state, label, *, example, workdir, threads, export_tolerance, opset=17):
        from shrinkml.artifacts import onnx_artifact

        return onnx_artifact(state, label, self.name, example=example, workdir=workdir, threads=threads,
                             tolerance=export_tolerance, opset=opset)

    def runner(self, artifact, *, threads: int) -> OrtRunner:
        return OrtRunner(artifact.path, threads=threads)

    def peak_memory(self, artifact, batch, *, threads: int, workdir) -> int:
        from shrinkml.measure import memory

        feeds = OrtRunner(artifact.path, threads=threads).feeds(batch)
        return memory.peak_memory_onnx(artifact.path, feeds, threads=threads)

    def load_instruction(self, file_name: str) -> str:
        return f"onnxruntime.InferenceSession({file_name!r})"

    def describe(self, runner: OrtRunner) -> dict:
        import onnxruntime as ort

        return {"version": ort.__version__, "device": "CPU", "providers": runner.session.get_providers(),
                "thread_spinning": False}


RUNTIME = OnnxRuntime()
