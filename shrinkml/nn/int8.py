"""INT8-stored weights that compute in bfloat16: the modules ``quantize.bf16`` puts in a model.

``Int8Linear`` and ``Int8Embedding`` hold symmetric per-row INT8 codes and float32 scales (what the
safetensors file stores) and the bfloat16 weight dequantized from them once (what the kernels use,
rebuilt on load, never saved). ``dequantized_copy`` turns them back into plain bfloat16 modules for
loaders that know only ``nn.Linear`` / ``nn.Embedding``. The step itself, and the file format, are in
``shrinkml.techniques.quantize_bf16``.

In inference ``Int8Linear`` multiplies with oneDNN's bfloat16 kernel on a weight reordered once into
the kernel's blocked layout (``prepacked_linear``), as PyTorch's own compiler does for frozen CPU
models: a plain ``F.linear`` reorders the weight on every call (1.8x slower on a 858 x 384 x 1536
product here). Where PyTorch has no such kernel (no oneDNN, no bfloat16 support in it) or
``SHRINKML_NO_PREPACK=1`` is set, it is ``F.linear``; both give the same numbers.
"""

from __future__ import annotations

import copy
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 codes (-127..127) and float32 scales of a 2-D weight."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class Int8Weight(nn.Module):
    """Holds ``weight_int8`` codes and ``weight_scale`` (saved) and the bfloat16 ``weight`` made from
    them (not saved: rebuilt from the codes on load)."""

    def _init_codes(self, weight: torch.Tensor, values: bool,
                    codes_scale: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if codes_scale is not None:  # codes chosen elsewhere (GPTQ), on the same -127..127 grid
            codes, scale = codes_scale[0].to(torch.int8), codes_scale[1].float()
        elif values:
            codes, scale = _int8_codes(weight)
        else:  # shapes only, on the meta device: load_int8 assigns the file's tensors
            codes = torch.empty(weight.shape, dtype=torch.int8, device="meta")
            scale = torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight", self.dequantized(), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_weight)

    def dequantized(self) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(torch.bfloat16)


def _refresh_weight(module: Int8Weight, _incompatible: Any) -> None:
    module.weight = module.dequantized()


class Int8Linear(Int8Weight):
    """``nn.Linear`` computing in bfloat16 with a weight stored as per-output-channel INT8 codes.
    ``values=False`` takes only ``linear``'s shapes (tensors on the meta device, never reading it);
    ``codes`` gives the INT8 codes and per-row scales to hold instead of rounding ``linear``'s weight."""

    def __init__(self, linear: nn.Linear, *, values: bool = True,
                 codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_codes(linear.weight, values, codes)
        if linear.bias is None:
            self.bias = None
        else:
            bias = linear.bias.detach().to(torch.bfloat16) if values else torch.empty(
                linear.bias.shape, dtype=torch.bfloat16, device="meta")
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and x.requires_grad):
            out = prepacked_linear(self, x)
            if out is not None:
                return out
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=torch.bfloat16)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class Int8Embedding(Int8Weight):
    """``nn.Embedding`` whose table is stored as per-row INT8 codes, looked up in bfloat16.
    ``values=False`` takes only ``embedding``'s shapes (as for ``Int8Linear``)."""

    def __init__(self, embedding: nn.Embedding, *, values: bool = True) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self._init_codes(embedding.weight, values)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def to_embedding(self) -> nn.Embedding:
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, dtype=torch.bfloat16)
        with torch.no_grad():
            out.weight.copy_(self.weight)
        return out


# module -> (weight tensor, its version, packed weight): kept outside the module so that
# copying, pickling and state dicts never see oneDNN's opaque tensors
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREPACK_OK: bool | None = None


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter (None for inference tensors, which keep none)."""
    return None if tensor.is_inference() else tensor._version


def _register_flop_formula() -> None:
    """Let ``FlopCounterMode`` (``shrinkml.measure.macs``) count the prepacked kernel as the product it is."""
    try:
        from torch.utils.flop_counter import register_flop_formula

        @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
        def _flops(x_shape, w_shape, *args, **kwargs) -> int:  # noqa: ARG001
            rows = 1
            for d in x_shape[:-1]:
                rows *= d
            return 2 * rows * x_shape[-1] * w_shape[0]
    except (AttributeError, ImportError, RuntimeError, ValueError):  # no such kernel: nothing to count
        pass


_register_flop_formula()


def prepack_available() -> bool:
    """Whether this PyTorch has oneDNN's prepacked bfloat16 linear kernel and this CPU runs it."""
    global _PREPACK_OK
    if os.environ.get("SHRINKML_NO_PREPACK") == "1":
        return False
    if _PREPACK_OK is None:
        try:
            _PREPACK_OK = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                               and hasattr(torch.ops.mkldnn, "_linear_pointwise"))

        except (AttributeError, RuntimeError):
            _PREPACK_OK = False
    return _PREPACK_OK


def prepacked_linear(module: Int8Linear, x: torch.Tensor) -> torch.Tensor | None:
    """``F.linear(x, module.weight, module.bias)`` with the weight reordered once for oneDNN's kernel
    (and again whenever the weight changes), or None where that kernel is not available."""
    global _PREPACK_OK
    weight = module.weight
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dtype != torch.bfloat16 \
            or not prepack_available():
        return None
    cached = _PACKED.get(module)
    try:
        if cached is None or cached[0] is not weight or cached[1] != _version(weight):
            cached = (weight, _version(weight), torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
            _PACKED[module] = cached
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        bias = None if module.bias is None else module.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(flat, cached[2], bias, "none", [], "")
    except RuntimeError:  # a kernel this CPU or build cannot run: plain F.linear from now on
        _PREPACK_OK = False
        return None
    return out.reshape(*x.shape[:-1], out.shape[-1])


def stacked_linear(owner: nn.Module, parts: tuple[Int8Linear, ...], x: torch.Tensor) -> torch.Tensor | None:
    """``cat([p(x) for p in parts], -1)`` as one prepacked product on the stacked weights (cached on
    ``owner``, rebuilt when any weight changes), or None where the kernel is not available."""
    global _PREPACK_OK
    if x.device.type != "cpu" or not prepack_available() or len({p.bias is None for p in parts}) > 1:
        return None
    weights = tuple(p.weight for p in parts)
    cached = _PACKED.get(owner)
    try:
        if cached is None or any(a is not b for a, b in zip(cached[0], weights)) \
                or cached[1] != tuple(_version(w) for w in weights):
            stacked = torch.cat([w.detach() for w in weights], 0)
            biases = [p.bias for p in parts]
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            cached = (weights, tuple(_version(w) for w in weights),
                      torch.ops.mkldnn._reorder_linear_weight(stacked), bias)
            _PACKED[owner] = cached
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, cached[2], cached[3], "none", [], "")
    except RuntimeError:
        _PREPACK_OK = False
        return None
    return out.reshape(*x.shape[:-1], out.shape[-1])


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root``'s submodule ``name`` (dotted) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every INT8 module replaced by the plain bfloat16 module it computes as
    (what ``save_pretrained`` and plain loaders understand)."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, Int8Linear):
            replace_module(out, name, module.to_linear())
        elif isinstance(module, Int8Embedding):
            replace_module(out, name, module.to_embedding())
    return out


def has_int8_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds any ``Int8Linear`` / ``Int8Embedding``."""
    return any(isinstance(m, Int8Weight) for m in model.modules())


# --- float32 in, float32 out (forward hooks on the whole model) ----------------------------------


def inputs_to_bf16(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def output_to_float32(_module: nn.Module, _args: tuple, output: Any) -> Any:
    if torch.is_tensor(output) and output.is_floating_point():
        return output.float()
    return output
