"""ONNX Runtime GenAI on CPU (``pip install onnxruntime-genai``): measures a decoder LLM as the folder
ORT GenAI loads (``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` + tokenizer files),
with ORT GenAI's own KV-cache loop and ONNX Runtime's CPU kernels (``MatMulNBits`` for int4/int8
weights, ``GroupQueryAttention``).

Folders come from ORT GenAI's model builder (``python -m onnxruntime_genai.models.builder``), run by
:func:`build_folder` in a child process: the builder imports torch and transformers, calls
``logging.basicConfig`` at import and prints every tensor it writes, none of which belongs in the
measuring process; the child also runs with the Hugging Face hub offline. The builder reads a local
Hugging Face causal-LM directory, float or GPTQ-quantized (``quantization_config.quant_method:
gptq`` in config.json; :func:`write_gptq_checkpoint` writes one from integer codes).

What the measurements mean:

- ``logits(ids)``: every window from an empty KV cache (a fresh ``og.Generator`` per window), the
  logits of all its positions read with ``get_output("logits")`` after ``append_tokens`` (ORT GenAI
  returns every position of an appended prompt), ``(B, T, V)`` float32;
- ``generate(prompt, n)``: the prompt appended in one call (the prefill, timed until its last
  logits are in hand), the first token chosen by argmax of those logits in Python, then ``n - 1``
  single-token ``append_tokens`` steps, each with the argmax, on the wall clock. The greedy choice
  is numpy's argmax, as in every other runtime, never ORT GenAI's search.

Threads: ``intra_op_num_threads`` and one inter-op thread are set through ``og.Config.overlay`` on
the loaded config, so the folder's ``genai_config.json`` is never rewritten.

>>> folder = build_folder(Path("smollm2-hf"), Path("smollm2-int4"), precision="int4", threads=2)  # doctest: +SKIP
>>> gen = OrtGenAIGenerator(folder, threads=2, context=512, new_tokens=128)  # doctest: +SKIP
>>> gen.describe()["weights"]  # doctest: +SKIP
{'precision': 'int4', 'MatMulNBits': [{'bits': 4, 'block_size': 32, 'accuracy_level': 4, ...}]}
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shrinkml.errors import InputError, brief

INSTALL_HINT = ("pip install onnxruntime-genai (0.18 or newer; it needs onnxruntime>=1.31), or measure on"
                " --runtime torch")
PRECISIONS = ("fp32", "int4", "int8")  # what the builder makes for the CPU execution provider
BLOCK_SIZES = (16, 32, 64, 128, 256)
PREQUANTIZED_METHODS = ("gptq", "awq")  # quant_method values the builder reads qweight/qzeros/scales of
BUILD_TIMEOUT_S = 3600
# llama.cpp block formats whose values are exactly GPTQ's scale * (q - zero) with groups of 32: bits and the
# offset that turns the stored code into GPTQ's unsigned one (Q4_0: d * (q - 8), q 0..15; Q8_0: d * q, q signed)
_GPTQ_OF = {"Q4_0": (4, 0), "Q8_0": (8, 128)}


def _import():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise InputError("--runtime onnxruntime-genai needs onnxruntime-genai, which is not installed",
                         where="--runtime onnxruntime-genai", found=f"{type(exc).__name__}: {exc}",
                         fix=INSTALL_HINT) from None
    return og


def available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------- building
def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError("ORT GenAI's model builder needs a Hugging Face config.json", where=str(path),
                         expected="a JSON object", found=f"{type(exc).__name__}: {brief(str(exc), 120)}",
                         fix="pass a Hugging Face causal-LM directory (save_pretrained writes one)") from None
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object", where=str(path), found=brief(config))
    return config


def _stage_beside(out_dir: Path) -> Path:
    """A scratch folder on the same file system as ``out_dir``, so the result can be renamed into place."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError("the output folder already exists", where=str(out_dir), expected="a new or empty folder",
                         fix="remove it or pass another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))


def _move_into_place(built: Path, out_dir: Path) -> Path:
    if out_dir.is_dir():
        out_dir.rmdir()  # empty (checked before building); rename cannot replace a folder on every OS
    os.replace(built, out_dir)
    return out_dir


def _builder_options(config: dict, precision: str, block_size: int, symmetric: bool | None,
                     accuracy_level: int | None, where: str, quantized_head: bool = False) -> list[str]:
    """The builder's ``--extra_options`` for one build, checked before the child process starts."""
    options = ["hf_token=false"]  # a local directory: never look up a token
    if accuracy_level is not None:
        if accuracy_level not in range(5):
            raise InputError("MatMulNBits accuracy_level is 0 to 4", where=where, found=str(accuracy_level),
                             fix="pass 0 (the EP's default), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8 activations)")
        if precision != "fp32":
            options.append(f"accuracy_level={accuracy_level}")
    qc = config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method:
        if method not in PREQUANTIZED_METHODS:
            raise InputError(f"the checkpoint is quantized with {method!r}, which this runtime does not build",
                             where=where, expected=f"quant_method one of {PREQUANTIZED_METHODS} or a float model",
                             fix="pass the float checkpoint")
        bits = int(qc.get("bits", 0))
        if precision != f"int{bits}":
            raise InputError(f"a {bits}-bit {method} checkpoint builds at precision int{bits} only", where=where,
                             found=f"precision {precision!r}", fix=f"pass precision='int{bits}'")
        if quantized_head:
            # the checkpoint holds the tied head's codes: the embedding reads the same codes through
            # GatherBlockQuantized (stored once), and nothing is left float for the builder to round
            if not config.get("tie_word_embeddings", False):
                raise InputError("a quantized output head is shared with the embedding only when they are tied",
                                 where=where, found="tie_word_embeddings false",
                                 fix="leave the head float (quantized_head=False) for an untied model")
            options.append("shared_embeddings=true")
            return options
        # the codes are the checkpoint's: the builder must not round any float MatMul it left
        # (lm_head and the embedding, often tied) with its own RTN, so those stay float
        options += ["nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"]
        return options
    if precision not in PRECISIONS:
        raise InputError("ORT GenAI's CPU builds are fp32, int4 or int8", where=where,
                         found=brief(precision), fix=f"pass precision one of {PRECISIONS}")
    if precision == "fp32":
        return options
    if block_size not in BLOCK_SIZES:
        raise InputError("MatMulNBits block sizes are powers of two from 16 to 256", where=where,
                         found=str(block_size), fix=f"pass block_size one of {BLOCK_SIZES}")
    options.append(f"block_size={block_size}")
    if symmetric is not None:
        options.append(f"is_symmetric={'true' if symmetric else 'false'}")
        if not symmetric and precision == "int4" and config.get("tie_word_embeddings", False):
            # onnxruntime-genai 0.18 writes an asymmetric tied int4 embedding (GatherBlockQuantized) without
            # its scales, and ORT refuses the model at load; an untied embedding loads
            options.append("shared_embeddings=false")
    return options


def build_folder(hf_dir: Path, out_dir: Path, *, precision: str, block_size: int = 32, symmetric: bool | None = None,
                 threads: int, accuracy_level: int | None = None, quantized_head: bool = False) -> Path:
    """Run ORT GenAI's model builder on the local Hugging Face causal-LM directory ``hf_dir`` for the
    CPU execution provider and write the folder ORT GenAI loads at ``out_dir`` (staged beside it,
    renamed into place when complete; ``out_dir`` must be new or empty).

    ``precision``: ``fp32``, ``int4`` or ``int8`` (weight-only ``MatMulNBits``, the builder's RTN with
    ``block_size``; ``symmetric`` None keeps the builder's default, symmetric; ``accuracy_level`` None
    keeps its CPU default, 4: activations quantized to int8 inside the matrix products). A GPTQ/AWQ
    checkpoint keeps its own codes (``precision`` must be ``int{bits}``; ``block_size`` and
    ``symmetric`` come from the checkpoint) and its float ``lm_head`` stays float; with
    ``quantized_head`` its ``lm_head`` holds codes too, tied to the embedding, which then reads those
    codes through ``GatherBlockQuantized`` (one copy). ``threads``: the builder's torch/OpenMP threads.
    The hub is offline in the builder's process.

    >>> build_folder(Path("hf"), Path("int4"), precision="int4", block_size=32, threads=2)  # doctest: +SKIP
    PosixPath('int4')
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = _read_config(hf_dir)
    options = _builder_options(config, precision, block_size, symmetric, accuracy_level, str(hf_dir), quantized_head)
    _import()  # refuse before building when the runtime cannot load the result
    stage = _stage_beside(out_dir)
    try:
        built = stage / "model"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir.resolve()), "-o", str(built),
               "-p", precision, "-e", "cpu", "-c", str(stage / "cache"), "--extra_options", *options]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, cwd=stage, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=BUILD_TIMEOUT_S, check=False)
        log = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0 or not (built / "genai_config.json").is_file():
            tail = " | ".join(line.strip() for line in log.replace("\r", "\n").splitlines()[-6:] if line.strip())
            raise InputError(f"ORT GenAI's model builder failed (exit {proc.returncode})", where=str(hf_dir),
                             found=tail or "no output",
                             fix="check the directory loads with transformers and its architecture is one the"
                             " builder supports (llama, mistral, qwen2/3, phi3, gemma, ...)")
        _two_dimensional_gather_scales(built / "model.onnx", rows=int(config.get("vocab_size", 0)))
        return _move_into_place(built, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _two_dimensional_gather_scales(onnx_path: Path, rows: int) -> None:
    """Give every ``GatherBlockQuantized`` its scales and zero points as ``(rows, blocks)``.

    onnxruntime-genai 0.18's builder feeds the tied embedding's ``GatherBlockQuantized`` the output
    head's ``MatMulNBits`` scales and zero points, which are flat (``rows * blocks``), and ONNX Runtime
    refuses the model at load ("scales must have the same rank as data"). A ``Reshape`` to ``(rows,
    -1)`` in front of each such input (``rows``: the vocabulary) fixes it without copying a weight; the
    external data file is not touched. A graph without such an input is left as it is."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    changed = False
    for node in [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]:
        for i in (2, 3):  # scales, zero_points
            if len(node.input) <= i or ranks.get(node.input[i]) != 1:
                continue
            name = node.input[i]
            shape = f"{name}/shrinkml/shape"
            if shape not in ranks:
                model.graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
                ranks[shape] = 1
            model.graph.node.insert(0, helper.make_node("Reshape", [name, shape], [f"{name}/shrinkml/2d"],
                                                        name=f"{name}/shrinkml/Reshape"))
            node.input[i] = f"{name}/shrinkml/2d"
            changed = True
    if changed:
        onnx.save(model, str(onnx_path))


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along axis 0, ``32 // bits`` per int32, the first value in
    the lowest bits (GPTQ's qweight layout)."""
    per = 32 // bits
    rows, cols = values.shape
    v = values.astype(np.uint32).reshape(rows // per, per, cols)
    out = np.zeros((rows // per, cols), dtype=np.uint32)
    for j in range(per):
        out |= v[:, j, :] << np.uint32(bits * j)
    return out.view(np.int32)


def gptq_declared_bits(bits: int, head_bits: int | None) -> int:
    """The bit width :func:`write_gptq_checkpoint` declares (and :func:`build_folder` builds at):
    the Linears' ``bits``, or 4 when the head holds codes (the others then per-module overrides)."""
    return 4 if head_bits is not None else int(bits)


def write_gptq_checkpoint(model, codes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], out_dir: Path,
                          bits: int, group_size: int, *, tokenizer=None, head_bits: int | None = None) -> Path:
    """Write ``model`` (a transformers ``*ForCausalLM``) as a GPTQ checkpoint directory in the layout
    ORT GenAI's builder reads (``loaders/gptq.py``), with the given integer codes for its Linears.

    ``codes[name] = (q, scales, zeros)`` for the Linear ``name`` (e.g. ``model.layers.0.mlp.down_proj``):
    ``q`` ``(out, in)`` unsigned codes in ``[0, 2**bits)``, ``scales`` ``(out, in // group_size)``
    (stored as float16, which is what the builder keeps), ``zeros`` ``(out, in // group_size)``
    unsigned integer zero points (symmetric: ``2**(bits - 1)``); the weight is ``scale * (q - zero)``.
    Written per Linear: ``qweight`` int32 ``(in / p, out)`` with ``p = 32 // bits`` input rows per
    word, lowest bits first; ``qzeros`` int32 ``(groups, out / p)`` holding ``zero - 1`` (GPTQ's stored
    offset, which the builder adds back); ``scales`` float16 ``(groups, out)``; ``g_idx`` int32
    ``(in,)`` = ``i // group_size`` (no act-order). Every other tensor is written as it is (float).
    ``lm_head`` may be in ``codes`` also when it is tied to the embedding (build the folder with
    ``quantized_head=True``: the embedding then reads the head's codes); ``head_bits`` gives it a bit
    width of its own (a GPTQ ``dynamic`` override, which the builder's loader reads per tensor).
    ``tokenizer``: saved beside it (the builder needs one). Staged and renamed into place.

    >>> write_gptq_checkpoint(model, {"model.layers.0.mlp.down_proj": (q, s, z)}, Path("gptq"), 4, 32)  # doctest: +SKIP
    """
    import torch
    from safetensors.torch import save_file

    if bits not in (4, 8) or head_bits not in (None, 4, 8):
        raise ValueError(f"ORT GenAI builds 4- and 8-bit MatMulNBits on CPU, not {bits}-bit (head {head_bits})")
    if head_bits is not None and "lm_head" not in codes:
        raise ValueError("head_bits is the bit width of lm_head's codes, and codes hold none for lm_head")
    out_dir = Path(out_dir)
    modules = dict(model.named_modules())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    symmetric = True
    for name, (q, scales, zeros) in codes.items():
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{name!r} is not a Linear of this model")
        nbits = head_bits if name == "lm_head" and head_bits is not None else bits
        per = 32 // nbits
        n_out, n_in = linear.weight.shape
        groups = n_in // group_size
        q, scales, zeros = np.asarray(q), np.asarray(scales), np.asarray(zeros)
        if n_in % group_size or n_in % per or n_out % per:
            raise ValueError(f"{name}: {n_in} inputs and {n_out} outputs do not pack in groups of {group_size},"
                             f" {per} codes per int32")
        if q.shape != (n_out, n_in) or scales.shape != (n_out, groups) or zeros.shape != (n_out, groups):
            raise ValueError(f"{name}: codes {q.shape}, scales {scales.shape}, zeros {zeros.shape}; expected"
                             f" {(n_out, n_in)}, {(n_out, groups)}, {(n_out, groups)}")
        top = 2**nbits
        if q.min() < 0 or q.max() >= top or zeros.min() < 0 or zeros.max() >= top:
            raise ValueError(f"{name}: codes and zero points must lie in [0, {top})")
        symmetric = symmetric and bool((zeros == top // 2).all())
        stored_zeros = (zeros.astype(np.int64) - 1) & (top - 1)
        tensors[f"{name}.qweight"] = torch.from_numpy(_pack_rows(q.T, nbits).copy())
        tensors[f"{name}.qzeros"] = torch.from_numpy(_pack_rows(stored_zeros, nbits).T.copy())
        tensors[f"{name}.scales"] = torch.from_numpy(scales.T.astype(np.float16).copy())
        tensors[f"{name}.g_idx"] = torch.arange(n_in, dtype=torch.int32) // group_size
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().float().contiguous()
    coded = {f"{name}.weight" for name in codes} | {f"{name}.bias" for name in codes}
    for key, value in model.state_dict().items():
        if key in coded or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = value.detach().contiguous()
    stage = _stage_beside(out_dir)
    try:
        built = stage / "checkpoint"
        built.mkdir()
        save_file(tensors, str(built / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        if not config.get("architectures"):  # a model made from a config, never saved, names none
            config["architectures"] = [type(model).__name__]
        # A quantized head is declared a 4-bit checkpoint: only a 4-bit build shares the head's codes
        # with the embedding (GatherBlockQuantized); 8-bit modules are GPTQModel's per-module
        # overrides, which the builder's loader reads tensor by tensor
        declared = gptq_declared_bits(bits, head_bits)
        config["quantization_config"] = {"quant_method": "gptq", "bits": declared, "group_size": int(group_size),
                                         "desc_act": False, "sym": symmetric, "checkpoint_format": "gptq"}
        dynamic = {}
        if bits != declared:
            dynamic[r"+:^model\."] = {"bits": int(bits)}
        if head_bits is not None and head_bits != declared:
            dynamic[r"+:^lm_head\."] = {"bits": int(head_bits)}
        if dynamic:
            config["quantization_config"]["dynamic"] = dynamic
        (built / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(built))
        return _move_into_place(built, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------- describing
def weight_summary(onnx_path: Path) -> dict[str, Any]:
    """What the graph computes its matrix products with: op counts and each ``MatMulNBits`` /
    ``GatherBlockQuantized`` configuration (bits, block size, accuracy level, zero points or not)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    configs: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            has_zp = len(node.input) > 3 and bool(node.input[3])  # input 3 is zero_points in both ops
            configs[(node.op_type, int(attrs.get("bits", 4)), int(attrs.get("block_size", 0)),
                     attrs.get("accuracy_level"), has_zp)] += 1
    quantized = sorted({bits for (op, bits, *_), _n in configs.items() if op == "MatMulNBits"})
    precision = "+".join(f"int{b}" for b in quantized) if quantized else "fp32"
    if quantized and ops.get("MatMul", 0):
        precision += f" ({ops['MatMul']} MatMul left float)"
    out: dict[str, Any] = {"precision": precision,
                           "op_counts": {k: ops[k] for k in ("MatMul", "MatMulNBits", "Gather", "GatherBlockQuantized",
                                                             "GroupQueryAttention") if ops.get(k)}}
    for (op, bits, block, level, has_zp), n in sorted(configs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        entry = {"count": n, "bits": bits, "block_size": block, "zero_points": has_zp}
        if level is not None:
            entry["accuracy_level"] = int(level)
        out.setdefault(op, []).append(entry)
    return out


# ---------------------------------------------------------------------------------- measuring
class OrtGenAIGenerator:
    """A folder loaded by ORT GenAI on CPU: ``logits`` for scoring, ``generate`` for timing (the same
    interface as :class:`shrinkml.measure.lm.TorchGenerator` and ``LlamaCppGenerator``)."""

    def __init__(self, folder: str | os.PathLike, *, threads: int, context: int, new_tokens: int = 128) -> None:
        og = _import()
        self.folder = Path(folder)
        config_path = self.folder / "genai_config.json"
        if not config_path.is_file():
            raise InputError("the folder has no genai_config.json", where=str(self.folder),
                             expected="a folder written by ORT GenAI's model builder",
                             fix="build one with shrinkml.runtimes.ortgenai.build_folder or"
                             " python -m onnxruntime_genai.models.builder")
        self._genai_config = json.loads(config_path.read_text())
        decoder = self._genai_config.get("model", {}).get("decoder", {})
        self.threads = int(threads)
        self.window = int(context)
        context_length = int(self._genai_config.get("model", {}).get("context_length") or 0)
        self.max_length = int(context + max(new_tokens, 1) + 8)
        if context_length:
            self.max_length = min(self.max_length, context_length)
        self.n_vocab = int(self._genai_config.get("model", {}).get("vocab_size") or 0)
        self._onnx_path = self.folder / decoder.get("filename", "model.onnx")
        try:
            self._config = og.Config(str(self.folder))
            self._config.clear_providers()  # CPU, whatever the folder was built for
            self._config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
            self._model = og.Model(self._config)
        except Exception as exc:  # noqa: BLE001  (ORT GenAI raises RuntimeError for a model ORT refuses)
            raise InputError("ONNX Runtime GenAI could not load the folder", where=str(self.folder),
                             found=brief(str(exc), 240),
                             fix="rebuild it with ORT GenAI's model builder for the cpu execution provider") from None
        self._og = og

    def _generator(self, max_length: int):
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=int(max_length), batch_size=1)
        return self._og.Generator(self._model, params)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """``(B, T)`` token ids -> ``(B, T, V)`` float32 logits, each window from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)
        b, t = ids.shape
        if t > self.window:
            raise ValueError(f"windows of {t} tokens; this generator was made for {self.window}")
        out: np.ndarray | None = None
        for i in range(b):
            gen = self._generator(max(t, self.window))
            gen.append_tokens(ids[i][None].astype(np.int32))
            got = gen.get_output("logits")
            del gen
            if got.ndim != 3 or got.shape[:2] != (1, t):
                raise RuntimeError(f"ORT GenAI returned logits of shape {got.shape} for a {t}-token window"
                                   " (expected every position: was the folder built with prune_lm_head?)")
            if out is None:
                out = np.empty((b, t, got.shape[-1]), dtype=np.float32)
            out[i] = got[0]
        assert out is not None
        return out

    def generate(self, prompt: np.ndarray, new_tokens: int):
        from shrinkml.measure.lm import Generation

        prompt = np.asarray(prompt, dtype=np.int64)
        if len(prompt) > self.window or len(prompt) + new_tokens > self.max_length:
            raise ValueError(f"a {len(prompt)}-token prompt and {new_tokens} new tokens exceed this generator"
                             f" ({self.window} per prompt, {self.max_length} in all)")
        gen = self._generator(len(prompt) + new_tokens)  # allocating the KV cache is not part of the prefill
        step = np.empty((1, 1), dtype=np.int32)
        tokens: list[int] = []
        start = time.perf_counter()
        gen.append_tokens(prompt[None].astype(np.int32))
        logits = gen.get_logits()  # the last position's logits: the prefill is done when they are in hand
        prefill = time.perf_counter() - start
        token = int(np.argmax(logits[0, -1]))
        first = time.perf_counter() - start
        tokens.append(token)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            step[0, 0] = token
            gen.append_tokens(step)
            token = int(np.argmax(gen.get_logits()[0, -1]))
            tokens.append(token)
        decode = time.perf_counter() - t0
        del gen
        return Generation(prefill, first, decode, len(prompt), new_tokens, tuple(tokens))

    def describe(self) -> dict[str, Any]:
        import onnxruntime

        out: dict[str, Any] = {
            "runtime": "onnxruntime-genai", "onnxruntime_genai": getattr(self._og, "__version__", "unknown"),
            "onnxruntime": onnxruntime.__version__, "execution_provider": "cpu",
            "threads": self.threads, "inter_op_threads": 1, "model_type": self._genai_config.get("model", {}).get("type"),
            "kv_cache": "ORT GenAI's (past_present_share_buffer="
                        f"{self._genai_config.get('search', {}).get('past_present_share_buffer')})",
            "greedy": "numpy argmax of the last logits (ORT GenAI's search unused)",
        }
        try:
            out["weights"] = weight_summary(self._onnx_path)
        except Exception as exc:  # noqa: BLE001  (describing must not fail a measurement)
            out["weights"] = {"unreadable": brief(str(exc), 120)}
        return out

    def close(self) -> None:
        for part in ("_model", "_config"):
            if getattr(self, part, None) is not None:
                setattr(self, part, None)


def _gptq_codes(value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 / Q8_0 block codes as GPTQ's ``(q, scales, zeros)``: the signed codes shifted to unsigned
    (Q8_0's by 128; Q4_0's are stored 0..15 already) with the zero point in the middle, so ``scale *
    (q - zero)`` is exactly the block's value."""
    bits, offset = _GPTQ_OF[value.fmt.name]
    q = value.codes.astype(np.int16) + offset
    zeros = np.full(value.d.shape, 1 << (bits - 1), dtype=np.int16)
    return q.astype(np.uint8), value.d.astype(np.float32), zeros


class OrtGenAI:
    """The ``onnxruntime-genai`` runtime: causal LMs only (an ``LMRuntime``). The input model runs as an
    fp32 folder built once per model by ORT GenAI's builder; compressed models are folders."""

    name = "onnxruntime-genai"
    accepts = frozenset({"ortgenai"})
    artifact_suffix = ""
    artifact_format = "onnxruntime-genai folder"
    causal_lm_only = True
    # a GGUF file is not what this runtime measures (an fp32 rebuild of a file's dequantized weights would
    # be a model nobody deploys): compress and search trials write a folder (write_lm)
    measures_gguf = False
    artifact_name = "model"  # compress's OUT/model: the ORT GenAI folder
    # what a search samples by default on this runtime: the formats MatMulNBits holds exactly
    search_choices: ClassVar[dict[str, tuple[str, ...]]] = {"quantize.gguf__format": tuple(_GPTQ_OF)}

    def __init__(self) -> None:
        # one fp32 folder per loaded module, kept while this object lives: building costs seconds to
        # minutes, and a run asks for the baseline more than once (bench, compress, search trials)
        self._fp32: list[tuple[weakref.ref, tempfile.TemporaryDirectory, Path]] = []

    def check_installed(self) -> None:
        _import()

    def check_lm(self, loaded) -> None:
        """Refuse, before any text is read, what this runtime cannot measure."""
        _import()
        module = getattr(loaded, "module", None)
        if module is None or not hasattr(module, "save_pretrained"):
            raise InputError("--runtime onnxruntime-genai builds the model with ORT GenAI's builder from a"
                             " transformers causal LM, and this model is not one", where=str(loaded.source),
                             fix="pass a Hugging Face causal-LM directory or a .gguf file")

    def fp32_folder(self, loaded, *, threads: int) -> Path:
        """The fp32 ORT GenAI folder of ``loaded`` (built on first use, cached for its module)."""
        module = loaded.module
        for ref, _tmp, folder in self._fp32:
            if ref() is module and folder.is_dir():
                return folder
        tmp = tempfile.TemporaryDirectory(prefix="shrinkml-ortgenai-")
        root = Path(tmp.name)
        source = Path(str(loaded.source))
        if getattr(loaded.lm, "gguf_path", None) is None and (source / "config.json").is_file():
            hf_dir = source  # the user's directory, read as it is
        else:
            hf_dir = root / "hf"
            module.save_pretrained(str(hf_dir))
            loaded.lm.tokenizer.save_pretrained(str(hf_dir))
        folder = build_folder(hf_dir, root / "fp32", precision="fp32", threads=threads)
        if hf_dir.is_relative_to(root):
            shutil.rmtree(hf_dir, ignore_errors=True)
        self._fp32 = [entry for entry in self._fp32 if entry[0]() is not None]
        self._fp32.append((weakref.ref(module), tmp, folder))
        return folder

    def lm_generator(self, *, loaded=None, gguf_path=None, folder=None, threads: int, context: int,
                     new_tokens: int) -> OrtGenAIGenerator:
        """An ORT GenAI folder (``folder``), or the fp32 folder of the input model."""
        if folder is None:
            if gguf_path is not None:
                raise InputError("--runtime onnxruntime-genai does not measure GGUF files", where=str(gguf_path),
                                 expected="an ORT GenAI folder, or the input model (built as an fp32 folder)",
                                 fix="measure the GGUF on --runtime llamacpp or torch")
            folder = self.fp32_folder(loaded, threads=threads)
        return OrtGenAIGenerator(folder, threads=threads, context=context, new_tokens=new_tokens)

    def check_lm_steps(self, steps) -> None:
        """Refuse, before any step runs, a causal-LM recipe whose codes :meth:`write_lm` cannot hold:
        the builder takes one bit width of ``MatMulNBits`` with an integer zero point (Q4_0 or Q8_0
        for every Linear), so no promoted weights and no bits-per-weight mix."""
        for i, step in enumerate(steps):
            if getattr(step, "technique", None) != "quantize.gguf":
                continue
            if step.format not in _GPTQ_OF:
                raise InputError(f"quantize.gguf format {step.format} is a block format ONNX Runtime's MatMulNBits"
                                 " cannot hold exactly", where=f"steps[{i}].format",
                                 expected="format Q4_0 or Q8_0 (a scale per 32 weights and an integer zero point)",
                                 found=step.format, fix="use format: Q4_0 or Q8_0 with --runtime onnxruntime-genai,"
                                 " or --runtime llamacpp for the other block formats")
            if step.promote or step.bits_per_weight is not None:
                field = "promote" if step.promote else "bits_per_weight"
                raise InputError("ORT GenAI's builder takes one bit width per checkpoint, and this step mixes"
                                 " formats", where=f"steps[{i}].{field}", found=f"{field}: {getattr(step, field)}",
                                 fix="quantize every Linear to one format (no promote / bits_per_weight) for this"
                                 " runtime, or use --runtime llamacpp for mixed formats")

    def write_lm(self, state, loaded, path: Path, *, threads: int) -> Path:
        """The compressed causal LM ``state`` as an ORT GenAI folder at ``path``: its Q4_0 / Q8_0 block
        codes written as a GPTQ checkpoint (group 32, integer zero point 8 / 128: the same values
        exactly) and built by ORT GenAI's builder into ``MatMulNBits``. A tied embedding in Q4_0 or
        Q8_0 is written as the output head's codes (4- or 8-bit ``MatMulNBits``, its own bit width
        allowed) and read by the embedding through ``GatherBlockQuantized``: stored once, exactly the
        step's values. An untied model's embedding and head, a tied one in another format, and a
        vocabulary GPTQ's layout cannot pack (rows not a multiple of ``32 / bits``) stay float32 holding
        the values the step chose."""
        from shrinkml.formats.gguf_blocks import BlockCodes

        codes = state.weight_codes
        if not codes:
            raise InputError("a causal-LM recipe must end with a step that chooses block codes (quantize.gguf)",
                             where="the recipe", fix="add a quantize.gguf step at the end")
        module = state.torch_model
        linears: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        bits_seen: set[int] = set()
        head = module.get_output_embeddings()
        head_name = next((n for n, m in module.named_modules() if m is head), None)
        for name, value in codes.items():
            module_name = name.removesuffix(".weight")
            if not isinstance(value, BlockCodes) or module_name in (head_name, "model.embed_tokens"):
                continue  # float tensors, the embedding and the head: below
            fmt = value.fmt.name
            if fmt not in _GPTQ_OF:
                raise InputError(
                    f"{name} is {fmt}, which ONNX Runtime's MatMulNBits cannot hold exactly", where="the recipe's"
                    " quantize.gguf step", expected="format Q4_0 or Q8_0 (a scale per 32 weights and an integer"
                    " zero point)", found=fmt, fix="use format: Q4_0 or Q8_0 with --runtime onnxruntime-genai, or"
                    " --runtime llamacpp for the other block formats")
            bits_seen.add(_GPTQ_OF[fmt][0])
            linears[module_name] = _gptq_codes(value)
        if len(bits_seen) != 1:
            raise InputError("ORT GenAI's builder takes one bit width per checkpoint", where="the recipe's"
                             " quantize.gguf step", found=f"{sorted(bits_seen) or 'no'} bit Linear codes",
                             fix="quantize every Linear to one format (no promote / bits_per_weight) for this runtime")
        (bits,) = bits_seen
        embedding = codes.get("model.embed_tokens.weight")
        tied = (head is not None and head_name == "lm_head" and bool(getattr(module.config, "tie_word_embeddings", False))
                and head.weight is module.get_input_embeddings().weight)
        head_bits = None
        if tied and isinstance(embedding, BlockCodes) and embedding.fmt.name in _GPTQ_OF:
            candidate = _GPTQ_OF[embedding.fmt.name][0]
            if head.weight.shape[0] % (32 // candidate) == 0:  # GPTQ packs the zero points along the rows
                head_bits = candidate
                linears["lm_head"] = _gptq_codes(embedding)
        path = Path(path)
        checkpoint = path.parent / f".{path.name}.gptq"
        try:
            write_gptq_checkpoint(module, linears, checkpoint, bits, 32, tokenizer=loaded.lm.tokenizer, head_bits=head_bits)
            return build_folder(checkpoint, path, precision=f"int{gptq_declared_bits(bits, head_bits)}",
                                threads=threads, quantized_head=head_bits is not None)
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def load_instruction(self, file_name: str) -> str:
        return (f"onnxruntime-genai: model = og.Model(og.Config({file_name!r})); tokenizer = og.Tokenizer(model)"
                " (import onnxruntime_genai as og)")


RUNTIME = OrtGenAI()
