"""The machine and library versions every report names."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# instruction sets a measured speed can depend on (INT8 dot products, bfloat16 / FP16 arithmetic)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
             "amx_fp16", "asimd", "asimddp", "asimdhp", "bf16", "i8mm")


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's instruction-set flags (x86 ``flags`` / Arm ``Features`` of ``/proc/cpuinfo``), or
    None where they cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(*, threads: int, seed: int) -> dict:
    import os

    flags = cpu_flags()
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "torch_pruning": _version("torch-pruning"),
        "shrinkml": _version("shrinkml"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        # which of the speed-relevant instruction sets this CPU has: results depend on them
        "cpu_isa": None if flags is None else sorted(flags & set(ISA_FLAGS)),
        # when the report was written; the load during timing is in the report's "timing"
        "load_average_1_5_15m": _load_average(),
        "threads": threads,
        "onnxruntime_thread_spinning": False,
        "seed": seed,
        "platform": platform.platform(),
    }
