"""``quantize.bf16``: bfloat16 compute in PyTorch, with INT8 weights on disk.

On CPUs with native bfloat16 matrix units (Intel AMX or AVX512-BF16, recent AMD) PyTorch's oneDNN
kernels multiply bfloat16 several times faster than float32, with an 8-bit mantissa that keeps
transformer outputs within ~1e-3 cosine of float32. ONNX Runtime's CPU provider has no bfloat16
MatMul (1.32), so this step keeps the model in PyTorch (``--runtime torch``).

``weights: int8`` (the default) stores every Linear weight (and, with ``quantize_embeddings``, every
embedding table) as symmetric INT8 codes with one float32 scale per output channel (per row for
embeddings): the safetensors file holds the codes, about a quarter of the float32 bytes. When the
module is built (or loaded) the codes are dequantized once into the bfloat16 weight the kernels use,
so memory holds the codes and the bfloat16 weight; the report's peak-memory figure shows it.
``weights: bfloat16`` stores the bfloat16 weights themselves (half the float32 bytes).

Inputs that are floating point are cast to bfloat16 and outputs back to float32, so callers see
float32 as before. Whether the CPU has native bfloat16 is read from the machine and stated in the
summary: without it PyTorch emulates bfloat16 and the step makes the model slower, which the
report's latency figures show.

Recipe step (with ``--runtime torch``)::

    - technique: quantize.bf16
      weights: int8
      quantize_embeddings: true
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from shrinkml.errors import InputError
from shrinkml.techniques.base import ModelState, StepConfig, StepContext, StepResult, register

WHERE = "quantize.bf16"


class QuantizeBf16Config(StepConfig):
    """bfloat16 compute in PyTorch; Linear (and embedding) weights stored as INT8 codes or bfloat16."""

    technique: Literal["quantize.bf16"] = "quantize.bf16"
    weights: Literal["int8", "bfloat16"] = Field("int8", description="how weights are stored on disk")
    quantize_embeddings: bool = Field(True, description="nn.Embedding tables as INT8 codes too (weights: int8)")
    keep_float: tuple[str, ...] = Field(
        (), description="module-name globs whose weights stay bfloat16 instead of INT8 (weights: int8)"
    )


# --- modules -------------------------------------------------------------------------------------


def _int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 codes (-127..127) and float32 scales of a 2-D weight."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class _Int8Weight(nn.Module):
    """Holds ``weight_int8`` codes and ``weight_scale`` (saved) and the bfloat16 ``weight`` made from
    them (not saved: rebuilt from the codes on load)."""

    def _init_codes(self, weight: torch.Tensor) -> None:
        codes, scale = _int8_codes(weight)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight", self.dequantized(), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_weight)

    def dequantized(self) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(torch.bfloat16)


def _refresh_weight(module: _Int8Weight, _incompatible: Any) -> None:
    module.weight = module.dequantized()


class Int8Linear(_Int8Weight):
    """``nn.Linear`` computing in bfloat16 with a weight stored as per-output-channel INT8 codes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_codes(linear.weight)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=torch.bfloat16)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class Int8Embedding(_Int8Weight):
    """``nn.Embedding`` whose table is stored as per-row INT8 codes, looked up in bfloat16."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self._init_codes(embedding.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def to_embedding(self) -> nn.Embedding:
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, dtype=torch.bfloat16)
        with torch.no_grad():
            out.weight.copy_(self.weight)
        return out


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every INT8 module replaced by the plain bfloat16 module it computes as
    (what ``save_pretrained`` and plain loaders understand)."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, Int8Linear):
            _set(out, name, module.to_linear())
        elif isinstance(module, Int8Embedding):
            _set(out, name, module.to_embedding())
    return out


def load_int8(model: nn.Module, path: str) -> nn.Module:
    """Load a ``quantize.bf16`` ``model.safetensors`` into ``model`` (the original float32 architecture,
    e.g. from the factory or ``AutoModel``): the layers stored as INT8 become INT8 modules, the rest
    bfloat16, with float32 in and out. Returns the loaded model (a copy; ``model`` is left as it was).

    >>> q = load_int8(my_factory(), "out/model.safetensors")  # doctest: +SKIP
    """
    from shrinkml.models.safetensors_io import load_state_dict

    state = load_state_dict(path)
    out = copy.deepcopy(model).eval()
    if not any(k.startswith("transformer.pooler.") for k in state):
        _drop_unused_pooler(out)
    for name in [k[: -len(".weight_int8")] for k in state if k.endswith(".weight_int8")]:
        module = out.get_submodule(name)
        _set(out, name, Int8Linear(module) if isinstance(module, nn.Linear) else Int8Embedding(module))
    scales = {id(m): m.weight_scale for m in out.modules() if isinstance(m, _Int8Weight)}
    out = out.to(torch.bfloat16)
    for module in out.modules():
        if isinstance(module, _Int8Weight):
            module.weight_scale = scales[id(module)]
    out.load_state_dict(state)
    out.register_forward_pre_hook(_inputs_to_bf16)
    out.register_forward_hook(_output_to_float32)
    return out


def has_int8_modules(model: nn.Module) -> bool:
    return any(isinstance(m, _Int8Weight) for m in model.modules())


# --- float32 in, float32 out ---------------------------------------------------------------------


def _inputs_to_bf16(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to_float32(_module: nn.Module, _args: tuple, output: Any) -> Any:
    if torch.is_tensor(output) and output.is_floating_point():
        return output.float()
    return output


def _drop_unused_pooler(model: nn.Module) -> list[str]:
    """An embedding ``TextEncoder`` never uses its transformer's pooler (its output is pooled from the
    token states): drop it rather than store and run it. Returns the dropped module names."""
    from shrinkml.models.text import TextEncoder

    transformer = getattr(model, "transformer", None)
    if isinstance(model, TextEncoder) and model.kind == "embedding" and getattr(transformer, "pooler", None) is not None:
        transformer.pooler = None
        return ["transformer.pooler"]
    return []


def cpu_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix or vector instructions (x86 AMX / AVX512-BF16, Arm BF16)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16", " bf16"))


@register("quantize.bf16", QuantizeBf16Config, accepts=("torch",), produces="torch", runtime="torch")
def apply(state: ModelState, config: QuantizeBf16Config, ctx: StepContext) -> StepResult:
    model = copy.deepcopy(state.torch_model).eval()
    if any(p.dtype != torch.float32 for p in model.parameters()) or has_int8_modules(model):
        raise InputError(
            "quantize.bf16 needs a float32 model",
            where=WHERE,
            expected="float32 parameters",
            found="parameters of " + ", ".join(sorted({str(p.dtype) for p in model.parameters()})),
            fix="apply quantize.bf16 once, as the last step, to a float32 model",
        )
    dropped = _drop_unused_pooler(model)
    names = dict(model.named_modules())
    kept = sorted(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in config.keep_float))
    for glob in config.keep_float:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise InputError(
                f"no layer matches {glob!r}",
                where=f"{WHERE}.keep_float",
                expected="module-name globs matching Linear or Embedding layers",
                found=", ".join(n for n, m in names.items() if isinstance(m, nn.Linear | nn.Embedding))[:400],
                fix="use the module names listed",
            )
    int8_layers, before, after = [], 0, 0
    if config.weights == "int8":
        for name, module in list(model.named_modules()):
            if name in kept:
                continue
            if isinstance(module, nn.Linear):
                _set(model, name, Int8Linear(module))
            elif isinstance(module, nn.Embedding) and config.quantize_embeddings:
                _set(model, name, Int8Embedding(module))
            else:
                continue
            int8_layers.append(name)
            before += module.weight.numel() * 4
            after += module.weight.numel() + module.weight.shape[0] * 4
        if not int8_layers:
            raise InputError(
                "quantize.bf16 found no Linear or Embedding layer to store as INT8",
                where=WHERE,
                expected="nn.Linear / nn.Embedding layers outside keep_float",
                found=f"{len(kept)} kept float" if kept else "none in the model",
                fix="use weights: bfloat16, or narrow keep_float",
            )
    scales = {id(m): m.weight_scale for m in model.modules() if isinstance(m, _Int8Weight)}
    model = model.to(torch.bfloat16)
    for module in model.modules():  # .to() casts float buffers: the INT8 codes' scales stay float32
        if isinstance(module, _Int8Weight):
            module.weight_scale = scales[id(module)]
            module.weight = module.dequantized()
    model.register_forward_pre_hook(_inputs_to_bf16)
    model.register_forward_hook(_output_to_float32)
    native = cpu_native_bf16()
    summary = {
        "weights": config.weights,
        "compute_dtype": "bfloat16 (PyTorch)",
        "cpu_native_bf16": native,
        "int8_layers": len(int8_layers),
        "kept_bfloat16": kept,
        "dropped_unused_modules": dropped,
        "int8_weight_bytes": after,
        "float32_weight_bytes_of_those_layers": before,
    }
    if not native:
        summary["note"] = (
            "this CPU has no native bfloat16 instructions: PyTorch emulates them and the model is likely"
            " slower than float32 — the report's latency figures show the real effect"
        )
    return StepResult(ModelState("torch", torch_model=model), summary)
