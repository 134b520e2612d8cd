"""llama.cpp on CPU, through ``llama-cpp-python`` (``pip install 'shrinkml[llamacpp]'``, which builds
llama.cpp from source): measures a causal LM's GGUF file with llama.cpp's own kernels.

What it runs is the file itself, on its own: the original ``.gguf`` for the baseline, the written
``model.gguf`` for a compressed model. Quality figures come from llama.cpp's logits (its CPU
kernels quantize activations to 8 bits for the quantized matrix products, so its perplexity is
not PyTorch's on the same weights), speed from greedy generation with llama.cpp's KV cache:

- ``logits(ids)``: every window decoded from an empty KV cache in one batch, the logits of every
  position copied out (``(B, T, V)`` float32);
- ``generate(prompt, n)``: the prompt decoded in one batch (the prefill), the first token chosen
  by argmax of the last logits, then ``n - 1`` single-token decode steps, each timed with the
  wall clock around ``llama_decode`` and the argmax (what a greedy user waits for).

Settings stated in every report (``describe``): threads for both decode and batch, the context,
the batch size, flash attention off, and whether llama.cpp may repack weights into its CPU
"extra buffer types" (AMX / interleaved layouts). Repacking is off unless
``SHRINKML_LLAMACPP_REPACK=1``: with it on, llama-cpp-python 0.3.36 built for a Sapphire Rapids CPU
(AMX) crashed in ``llama_decode`` on every file tried (a segmentation fault, which no Python code
can catch). Every model in a run, anchors included, runs with the same setting.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.errors import InputError

INSTALL_HINT = ("pip install 'shrinkml[llamacpp]' (llama-cpp-python; it compiles llama.cpp from source, about"
                " 20 minutes on 2 cores), or measure on --runtime torch")


def _import():
    try:
        import llama_cpp
        from llama_cpp import _internals
    except ImportError as exc:
        raise InputError("--runtime llamacpp needs llama-cpp-python, which is not installed", where="--runtime llamacpp",
                         found=f"{type(exc).__name__}: {exc}", fix=INSTALL_HINT) from None
    _quiet(llama_cpp)
    return llama_cpp, _internals


_QUIET: list[Any] = []  # the log callback must outlive every call into llama.cpp


def _quiet(llama_cpp) -> None:
    """Send llama.cpp's log to nowhere unless SHRINKML_LLAMACPP_LOG is set (it prints every tensor)."""
    if _QUIET or os.environ.get("SHRINKML_LLAMACPP_LOG"):
        return

    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):
        return None

    _QUIET.append(_drop)
    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))


def repack_enabled() -> bool:
    return os.environ.get("SHRINKML_LLAMACPP_REPACK", "0") == "1"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppGenerator:
    """A GGUF file loaded by llama.cpp: ``logits`` for scoring, ``generate`` for timing (the same
    interface as :class:`shrinkml.measure.lm.TorchGenerator`)."""

    def __init__(self, path: str | os.PathLike, *, threads: int, context: int, new_tokens: int = 128) -> None:
        llama_cpp, internals = _import()
        self.path = Path(path)
        self.threads = threads
        self.repack = repack_enabled()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_mmap = True
        mparams.use_extra_bufts = self.repack
        try:
            self._model = internals.LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
        except ValueError as exc:
            raise InputError("llama.cpp could not load the GGUF file", where=str(self.path), found=str(exc),
                             fix="check the file with `python -m gguf.scripts.gguf_dump`; a file llama.cpp cannot"
                             " read cannot be measured on --runtime llamacpp") from None
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._model.vocab))
        self.window = int(context)
        self.n_ctx = int(context + max(new_tokens, 1) + 8)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.window
        cparams.n_ubatch = self.window
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if hasattr(cparams, "flash_attn_type"):
            cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED: the same attention for every file
        self._ctx = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=self.window, embd=0, n_seq_max=1, verbose=False)
        self._llama = llama_cpp

    # ------------------------------------------------------------------ helpers
    def _clear(self) -> None:
        self._ctx.kv_cache_clear()

    def _decode(self, tokens, n_past: int, all_logits: bool) -> None:
        self._batch.set_batch(batch=[int(t) for t in tokens], n_past=n_past, logits_all=all_logits)
        self._ctx.decode(self._batch)

    def _last_logits(self) -> np.ndarray:
        ptr = self._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # ------------------------------------------------------------------ interface
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """``(B, T)`` token ids -> ``(B, T, V)`` float32 logits, each window from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)
        b, t = ids.shape
        if t > self.window:
            raise ValueError(f"windows of {t} tokens; this llama.cpp context was made for {self.window}")
        out = np.empty((b, t, self.n_vocab), dtype=np.float32)
        for i in range(b):
            self._clear()
            self._decode(ids[i], 0, True)
            ptr = self._ctx.get_logits()
            out[i] = np.ctypeslib.as_array(ptr, shape=(t * self.n_vocab,)).reshape(t, self.n_vocab)
        return out

    def generate(self, prompt: np.ndarray, new_tokens: int):
        from shrinkml.measure.lm import Generation

        prompt = np.asarray(prompt, dtype=np.int64)
        if len(prompt) > self.window or len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(f"a {len(prompt)}-token prompt and {new_tokens} new tokens exceed this context"
                             f" ({self.window} per batch, {self.n_ctx} in all)")
        self._clear()
        tokens: list[int] = []
        start = time.perf_counter()
        self._decode(prompt, 0, False)
        logits = self._last_logits()  # reading the logits waits for the computation
        prefill = time.perf_counter() - start
        token = int(np.argmax(logits))
        first = time.perf_counter() - start
        tokens.append(token)
        pos = len(prompt)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self._decode([token], pos, False)
            token = int(np.argmax(self._last_logits()))
            tokens.append(token)
            pos += 1
        decode = time.perf_counter() - t0
        return Generation(prefill, first, decode, len(prompt), new_tokens, tuple(tokens))

    def describe(self) -> dict[str, Any]:
        import llama_cpp

        info = self._llama.llama_print_system_info()
        return {
            "runtime": "llamacpp", "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
            "system_info": info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info),
            "threads": self.threads, "threads_batch": self.threads, "n_ctx": self.n_ctx, "n_batch": self.window,
            "flash_attention": False, "weight_repacking": self.repack,
            "model_description": self._model.desc(),
        }

    def close(self) -> None:
        for part in ("_batch", "_ctx", "_model"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
                setattr(self, part, None)


class LlamaCpp:
    """The ``llamacpp`` runtime: causal LMs in GGUF files only (an ``LMRuntime``; the pipeline
    refuses it for array models before loading their data)."""

    name = "llamacpp"
    accepts = frozenset({"gguf"})
    artifact_suffix = ".gguf"
    artifact_format = "gguf"
    causal_lm_only = True
    # llama.cpp measures files: the float model in PyTorch is needed only by the steps, which walk it
    # one decoder layer at a time from the GGUF (shrinkml.models.lazy)
    lazy_lm = True

    def check_installed(self) -> None:
        _import()

    def check_lm(self, loaded) -> None:
        """Refuse, before any text is read, what llama.cpp cannot measure."""
        _import()
        if getattr(loaded.lm, "gguf_path", None) is None:
            raise InputError(
                "--runtime llamacpp measures GGUF files, and this causal LM was loaded without one",
                where=str(loaded.source), expected="a .gguf file, or a directory loaded with lazy_lm=True (converted to"
                " GGUF, as shrinkml compress and bench do)", fix="load it with shrinkml.models.load_model(...,"
                " lazy_lm=True), or pass --runtime torch")

    def lm_generator(self, *, loaded=None, gguf_path=None, threads: int, context: int, new_tokens: int):
        path = gguf_path if gguf_path is not None else loaded.lm.gguf_path
        return LlamaCppGenerator(path, threads=threads, context=context, new_tokens=new_tokens)

    def load_instruction(self, file_name: str) -> str:
        return f"llama.cpp: llama-cli -m {file_name}; llama_cpp.Llama(model_path={file_name!r})"



RUNTIME = LlamaCpp()
