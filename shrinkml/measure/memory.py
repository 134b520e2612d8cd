"""Peak memory of running a model, measured in a fresh child process.

In the measuring process itself, memory already held by earlier models, allocator caches and
imported libraries would blur the figure. A child process starts clean: it imports its runtime,
notes its resident set size (RSS), then loads the model, runs it twice and reports how far its
peak RSS rose above that starting point. The figure therefore includes the weights, the runtime's
arena and the activations, and excludes the interpreter and the libraries.

The child is ``python -m shrinkml.measure.memory MODE ARGS_JSON``; it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

# RSS is sampled this often while the model loads and runs; where the kernel's own high-water mark
# is readable it catches the short peaks that sampling misses.
_SAMPLE_INTERVAL_S = 0.002
_STDERR_TAIL_CHARS = 2000
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def save_module_for_child(module, path: Path) -> Path:
    """Pickle the whole ``module`` with ``torch.save`` for :func:`peak_memory_torch` to load."""
    import torch

    torch.save(module, path)
    return Path(path)


def _run_child(mode: str, args: dict, extra_paths: list[str], timeout_s: float) -> int:
    env = dict(os.environ)
    # The child must import this package (wherever the parent found it) and, for torch models,
    # the user's model classes, which torch.load needs to unpickle the module.
    paths = [_PACKAGE_ROOT, *extra_paths]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    threads = str(args["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    args = {**args, "parent_pid": os.getpid()}
    cmd = [sys.executable, "-m", "shrinkml.measure.memory", mode, json.dumps(args)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"peak-memory child ({mode}) did not finish within {timeout_s} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"peak-memory child ({mode}) failed with exit code {proc.returncode}; "
            f"its stderr ends with:\n{proc.stderr[-_STDERR_TAIL_CHARS:]}"
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return int(json.loads(line)["peak_increase_bytes"])
    raise RuntimeError(
        f"peak-memory child ({mode}) printed no result; stdout ends with {proc.stdout[-500:]!r}, "
        f"stderr ends with:\n{proc.stderr[-_STDERR_TAIL_CHARS:]}"
    )


def peak_memory_onnx(
    model_path: Path, inputs: dict[str, np.ndarray], *, threads: int, timeout_s: float = 600.0
) -> int:
    """Peak RSS increase in bytes of creating an ONNX Runtime CPU session and running it twice.

    >>> peak_memory_onnx(Path("model.onnx"), {"x": x}, threads=1)  # doctest: +SKIP
    48230400
    """
    # beside the model (the run's work folder): a killed run's leftovers are then the run's to clean
    with tempfile.TemporaryDirectory(prefix="shrinkml-mem-", dir=Path(model_path).parent) as tmp:
        inputs_path = Path(tmp) / "inputs.npz"
        np.savez(inputs_path, **inputs)
        args = {"model": str(Path(model_path).resolve()), "inputs": str(inputs_path), "threads": threads}
        return _run_child("onnx", args, [], timeout_s)


def peak_memory_openvino(
    model_path: Path, inputs: dict[str, np.ndarray], *, threads: int, timeout_s: float = 600.0
) -> int:
    """Peak RSS increase in bytes of compiling an ONNX file with OpenVINO's CPU plugin and running it twice
    on ``inputs`` (named feeds, ``shrinkml.runtimes.feeds``)."""
    with tempfile.TemporaryDirectory(prefix="shrinkml-mem-", dir=Path(model_path).parent) as tmp:
        inputs_path = Path(tmp) / "inputs.npz"
        np.savez(inputs_path, **inputs)
        args = {"model": str(Path(model_path).resolve()), "inputs": str(inputs_path), "threads": threads}
        return _run_child("openvino", args, [], timeout_s)


def peak_memory_torch(
    model_file: Path,
    inputs: dict[str, np.ndarray],
    *,
    threads: int,
    sys_path: list[str],
    timeout_s: float = 600.0,
) -> int:
    """Peak RSS increase in bytes of loading a pickled module and running ``model(**inputs)`` twice.

    ``model_file`` is written by :func:`save_module_for_child`; ``sys_path`` lists the folders
    the child needs to import the module's classes.

    >>> path = save_module_for_child(model, Path(tmp) / "model.pt")  # doctest: +SKIP
    >>> peak_memory_torch(path, {"x": x}, threads=1, sys_path=[str(Path.cwd())])  # doctest: +SKIP
    61071360
    """
    with tempfile.TemporaryDirectory(prefix="shrinkml-mem-", dir=Path(model_file).parent) as tmp:
        inputs_path = Path(tmp) / "inputs.npz"
        np.savez(inputs_path, **inputs)
        args = {"model": str(Path(model_file).resolve()), "inputs": str(inputs_path), "threads": threads}
        return _run_child("torch", args, [str(Path(p).resolve()) for p in sys_path], timeout_s)


# ----------------------------------------------------------------------------- child side


class _PeakSampler:
    """Samples this process's RSS on a background thread until stopped."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


_TRIM = None  # glibc's malloc_trim, once looked up (False where there is none)


def return_freed_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). A long job that frees many mid-sized arrays (a layer's weights, its statistics)
    otherwise keeps them in its heap: freed, reusable, but still resident."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def _kernel_peak_rss() -> int | None:
    """The kernel's exact RSS high-water mark of this process, in bytes (Linux: VmHWM)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_kernel_peak_rss() -> None:
    # Linux >= 4.0 lets a process reset its high-water mark to its current RSS, so that the peak
    # read later belongs to loading and running the model, not to importing the runtime.
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _measure(baseline_rss: int, load_and_run: Callable[[], None]) -> int:
    _reset_kernel_peak_rss()
    with _PeakSampler() as sampler:
        load_and_run()
    kernel_peak = _kernel_peak_rss()
    if kernel_peak is None:
        # Not Linux. getrusage's ru_maxrss is the fallback (KiB on most systems, bytes on macOS).
        # It is not used on Linux because exec carries the parent's high-water mark over into the
        # child's ru_maxrss, so a large parent would inflate every figure.
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return max(kernel_peak, sampler.peak) - baseline_rss


def _child_onnx(args: dict) -> int:
    import onnxruntime  # noqa: F401  (imported before the baseline, like the other runtimes)
    import psutil

    from shrinkml.runtimes.onnxruntime import session as ort_session

    baseline = psutil.Process().memory_info().rss

    def load_and_run() -> None:
        session = ort_session(args["model"], threads=args["threads"])
        with np.load(args["inputs"]) as data:
            feed = {name: data[name] for name in data.files}
        for _ in range(2):
            session.run(None, feed)

    return _measure(baseline, load_and_run)


def _child_openvino(args: dict) -> int:
    import openvino  # noqa: F401  (imported before the baseline, like the other runtimes)
    import psutil

    from shrinkml.runtimes.openvino import compile_model

    baseline = psutil.Process().memory_info().rss

    def load_and_run() -> None:
        # named feeds built by the parent: parsing the ONNX here to build them would count in the peak
        request = compile_model(args["model"], threads=args["threads"]).create_infer_request()
        with np.load(args["inputs"]) as data:
            feed = {name: data[name] for name in data.files}
        for _ in range(2):
            request.infer(feed)

    return _measure(baseline, load_and_run)


def _child_torch(args: dict) -> int:
    import psutil
    import torch

    torch.set_num_threads(args["threads"])
    torch.set_num_interop_threads(1)
    baseline = psutil.Process().memory_info().rss

    def load_and_run() -> None:
        # weights_only=False unpickles arbitrary objects; this is safe here only because the file
        # is one the parent process wrote into its own temporary folder moments ago.
        model = torch.load(args["model"], weights_only=False, map_location="cpu")
        with np.load(args["inputs"]) as data:
            # positional, in the order given: forward's parameter names are the user's choice
            feed = [torch.from_numpy(data[name]) for name in data.files]
        with torch.inference_mode():
            for _ in range(2):
                model(*feed)

    return _measure(baseline, load_and_run)


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this child when its parent dies (even by SIGKILL), so a killed run never
    leaves a measuring process behind; exit now if the parent is already gone."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        raise SystemExit(1)


def _child_main(argv: list[str]) -> None:
    mode, args = argv[0], json.loads(argv[1])
    _die_with_parent(args.get("parent_pid"))
    runners = {"onnx": _child_onnx, "openvino": _child_openvino, "torch": _child_torch}
    if mode not in runners:
        raise SystemExit(f"unknown mode {mode!r}; expected one of {sorted(runners)}")
    print(json.dumps({"peak_increase_bytes": int(runners[mode](args))}), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
