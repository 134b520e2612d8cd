"""The deployable artifact of a model state on a runtime: an ``.onnx`` file for ONNX Runtime and
OpenVINO, a ``.safetensors`` file for PyTorch. Sizes in the report are these files' bytes on disk.
Each runtime's ``prepare`` (``shrinkml.runtimes``) calls one of the two writers here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.core.types import ModelState
from shrinkml.errors import InputError


@dataclass
class Artifact:
    label: str
    runtime: str
    path: Path
    params: int
    nonzero_params: int
    macs: int | None
    module: Any = None  # torch.nn.Module, for the torch runtime
    export_max_abs_diff: float | None = None
    encoding: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def build_artifact(
    state: ModelState,
    label: str,
    *,
    runtime: str,
    example: np.ndarray,
    workdir: Path,
    threads: int,
    export_tolerance: float,
    opset: int = 17,
) -> Artifact:
    """Write ``state`` as the file a user would deploy on ``runtime`` and describe it."""
    from shrinkml.runtimes import runtime as get_runtime

    rt = get_runtime(runtime)
    if state.kind not in rt.accepts:
        raise InputError(
            f"the recipe produced a {state.kind} model, which cannot be measured on {runtime}",
            where=f"--runtime {runtime}",
            fix="use --runtime onnxruntime with ONNX quantization steps",
        )
    return rt.prepare(state, label, example=example, workdir=workdir, threads=threads,
                      export_tolerance=export_tolerance, opset=opset)


def onnx_artifact(
    state: ModelState, label: str, runtime: str, *, example: np.ndarray, workdir: Path, threads: int,
    tolerance: float, opset: int = 17, sparse: bool = True,
) -> Artifact:
    """The ``.onnx`` file of ``state`` (exported and verified when it is PyTorch); mostly-zero
    initializers stored sparse when ``sparse`` and that makes the file smaller."""
    import onnx

    from shrinkml.measure.macs import onnx_macs
    from shrinkml.measure.params import onnx_param_counts
    from shrinkml.runtimes.export import state_to_onnx
    from shrinkml.runtimes.onnx_sparse import encode_sparse_initializers

    model, diff = state_to_onnx(state, example=example, tolerance=tolerance, threads=threads, opset=opset, label=label)
    from shrinkml.runtimes.feeds import model_feeds

    macs = onnx_macs(model, {name: list(value.shape) for name, value in model_feeds(model, example[:1]).items()})
    encoded, encoding = encode_sparse_initializers(model) if sparse else (model, {})
    path = workdir / f"{label}.onnx"
    onnx.save(encoded, str(path))
    params, nonzero = onnx_param_counts(encoded)
    return Artifact(label, runtime, path, params, nonzero, macs, export_max_abs_diff=diff, encoding=encoding)


def torch_artifact(state: ModelState, label: str, *, example: np.ndarray, workdir: Path) -> Artifact:
    """The ``.safetensors`` state dict of a PyTorch state (sparse-encoded where smaller)."""
    import torch

    from shrinkml.measure.macs import torch_macs
    from shrinkml.measure.params import torch_param_counts
    from shrinkml.models.safetensors_io import save_state_dict
    from shrinkml.techniques.quantize_bf16 import file_metadata

    module = state.torch_model.eval()
    path = workdir / f"{label}.safetensors"
    # a quantize.bf16 model's file also records its architecture, so it loads on its own
    encoding = save_state_dict(module.state_dict(), path, metadata={"shrinkml.label": label, **file_metadata(module)})
    params, nonzero = torch_param_counts(module)
    macs = torch_macs(module, torch.as_tensor(example[:1]))
    return Artifact(label, "torch", path, params, nonzero, macs, module=module, encoding=encoding)
