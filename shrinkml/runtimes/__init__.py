"""The runtimes models are measured on, registered in ``shrinkml.core.registry.RUNTIMES``:
ONNX Runtime (CPU), OpenVINO (CPU) and PyTorch eager. ``runtime(name)`` returns one."""

from __future__ import annotations

from shrinkml.core.registry import RUNTIMES


def runtime(name: str):
    """The registered runtime ``name`` (imports its module; not its library until used)."""
    return RUNTIMES.get(name)


def runtime_names() -> tuple[str, ...]:
    return RUNTIMES.names()
