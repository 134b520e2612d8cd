"""What a runtime is to shrinkml: where a model state is turned into the file a user deploys, and
where that file is run, timed and measured.

A runtime is one module with one object registered in ``shrinkml.core.registry.RUNTIMES``
(``"name": "shrinkml.runtimes.module:RUNTIME"``). Everything that differs between runtimes lives
behind this protocol; measurement (``shrinkml.measure``) and the report only call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from shrinkml.artifacts import Artifact
    from shrinkml.core.types import ModelState


class Runner(Protocol):
    """A loaded model: ``run(x)`` returns its (first) output as a numpy array."""

    def run(self, x: np.ndarray) -> np.ndarray: ...


class Runtime(Protocol):
    """One inference runtime.

    ``accepts``: the model-state kinds it can run (``"torch"`` states are exported for ONNX-based
    runtimes). ``artifact_suffix`` / ``artifact_format``: the deployable file it measures.
    """

    name: str
    accepts: frozenset[str]
    artifact_suffix: str
    artifact_format: str

    def prepare(
        self, state: ModelState, label: str, *, example: np.ndarray, workdir: Path, threads: int,
        export_tolerance: float, opset: int = 17,
    ) -> Artifact:
        """Write ``state`` as the file a user would deploy on this runtime, and describe it."""

    def runner(self, artifact: Artifact, *, threads: int) -> Runner:
        """Load ``artifact`` with ``threads`` intra-op threads (and one inter-op thread)."""

    def peak_memory(self, artifact: Artifact, batch: np.ndarray, *, threads: int, workdir: Path) -> int:
        """Peak RSS increase (bytes) of loading and running ``artifact`` twice in a fresh process."""

    def load_instruction(self, file_name: str) -> str:
        """How a user loads the written file (for the output folder's manifest)."""

    def describe(self, runner: Runner) -> dict[str, Any]:
        """What the report must say about how ``runner`` computes (e.g. the precision it chose)."""


class LMGenerator(Protocol):
    """A loaded causal LM: logits of whole windows for scoring, timed greedy generation."""

    def logits(self, ids: np.ndarray) -> Any:
        """``(B, T)`` int64 token ids -> ``(B, T, V)`` logits (torch tensor or numpy array)."""

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Any:
        """Greedy generation with the KV cache, timed (``shrinkml.measure.lm.Generation``)."""


class LMRuntime(Protocol):
    """A runtime that measures causal LMs (``--task perplexity``). ``causal_lm_only``: it measures
    nothing else."""

    name: str
    causal_lm_only: bool

    def check_installed(self) -> None:
        """Refuse (``InputError``), before any model is read, when the runtime's library is missing."""

    def check_lm(self, loaded: Any) -> None:
        """Refuse (``InputError``), before any text is read, a model this runtime cannot measure."""

    def lm_generator(self, *, loaded: Any = None, gguf_path: Path | None = None, threads: int, context: int,
                     new_tokens: int) -> LMGenerator:
        """The model to measure: ``loaded`` (the input) or the GGUF file at ``gguf_path``."""
