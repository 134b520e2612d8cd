"""Lazy registries: a name maps to ``"package.module:attribute"`` and is imported only when used.

Listing names (``--runtime`` choices, ``shrinkml techniques``) or validating a recipe must not
import torch, ONNX Runtime or OpenVINO; a registry therefore holds import paths, and ``get`` imports
the one entry asked for. Registration is explicit: one ``add`` line per entry, next to the registry.

>>> RUNTIMES.names()  # doctest: +SKIP
('onnxruntime', 'openvino', 'torch')
>>> RUNTIMES.get("onnxruntime").name  # doctest: +SKIP
'onnxruntime'
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyRegistry:
    """Names to ``"module:attribute"`` targets, imported on first ``get`` and cached."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}

    def add(self, name: str, target: str) -> None:
        module, _, attr = target.partition(":")
        if not module or not attr:
            raise ValueError(f"{self.kind} {name!r}: target must be 'package.module:attribute', got {target!r}")
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._targets[name] = target

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._targets))

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def target(self, name: str) -> str:
        return self._targets[name]

    def get(self, name: str) -> Any:
        """The registered object (imports its module the first time). ``KeyError`` if unknown."""
        if name not in self._loaded:
            module, _, attr = self._targets[name].partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._loaded[name] = obj
        return self._loaded[name]


RUNTIMES = LazyRegistry("runtime")
RUNTIMES.add("llamacpp", "shrinkml.runtimes.llamacpp:RUNTIME")
RUNTIMES.add("onnxruntime", "shrinkml.runtimes.onnxruntime:RUNTIME")
RUNTIMES.add("onnxruntime-genai", "shrinkml.runtimes.ortgenai:RUNTIME")
RUNTIMES.add("openvino", "shrinkml.runtimes.openvino:RUNTIME")
RUNTIMES.add("torch", "shrinkml.runtimes.torch_eager:RUNTIME")

TASKS = LazyRegistry("task")
TASKS.add("classification", "shrinkml.tasks.classification:TASK")
TASKS.add("embedding", "shrinkml.tasks.embedding:TASK")
TASKS.add("fidelity", "shrinkml.tasks.fidelity:TASK")
TASKS.add("perplexity", "shrinkml.tasks.perplexity:TASK")
