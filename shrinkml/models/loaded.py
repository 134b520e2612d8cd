"""``LoadedModel``: a model as loaded (PyTorch module or ONNX graph) and what loading decided.

Its own module, importing nothing heavy and nothing else of shrinkml, so that every loader
(``models.load``, ``models.hf``) and every reader of a loaded model can import it without an import
cycle between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_LISTED = 3  # tensors named in one message


@dataclass
class LoadedModel:
    """The model as loaded. ``kind`` is ``torch`` (``module`` set) or ``onnx`` (``onnx_model`` set)."""

    kind: str
    source: str
    module: Any = None  # torch.nn.Module
    onnx_model: Any = None  # onnx.ModelProto
    weights: str | None = None
    text: Any = None  # shrinkml.models.hf.TextModelInfo for Hugging Face encoder directories
    lm: Any = None  # shrinkml.models.causal_lm.CausalLMInfo for decoder language models (dirs, GGUF)
    random_weights: bool = False  # a factory model run as built (--random-weights): no trained weights
    notes: list[str] = field(default_factory=list)  # decisions taken while loading, for the report
    # tensors the weights resized from the factory's shapes (a model saved after prune.channels):
    # name -> (shape as built, shape loaded)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def resized_summary(self) -> str | None:
        """One phrase naming the tensors the weights resized, for errors that follow (None if none)."""
        if not self.resized:
            return None
        shown = ", ".join(f"{name!r} {list(a)} -> {list(b)}" for name, (a, b) in list(self.resized.items())[:_LISTED])
        more = f" and {len(self.resized) - _LISTED} more" if len(self.resized) > _LISTED else ""
        return f"the weights {self.weights} resized {len(self.resized)} tensors of the factory's model ({shown}{more})"
