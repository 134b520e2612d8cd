"""INT8-stored weights that compute in bfloat16: the modules ``quantize.bf16`` puts in a model.

``Int8Linear`` and ``Int8Embedding`` hold symmetric per-row INT8 codes and float32 scales (what the
safetensors file stores) and the bfloat16 weight dequantized from them once (what the kernels use,
rebuilt on load, never saved). ``dequantized_copy`` turns them back into plain bfloat16 modules for
loaders that know only ``nn.Linear`` / ``nn.Embedding``. The step itself, and the file format, are in
``shrinkml.techniques.quantize_bf16``.
"""

from __future__ import annotations

import copy
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

    def _init_codes(self, weight: torch.Tensor, values: bool) -> None:
        if values:
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
    ``values=False`` takes only ``linear``'s shapes (tensors on the meta device, never reading it)."""

    def __init__(self, linear: nn.Linear, *, values: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_codes(linear.weight, values)
        if linear.bias is None:
            self.bias = None
        else:
            bias = linear.bias.detach().to(torch.bfloat16) if values else torch.empty(
                linear.bias.shape, dtype=torch.bfloat16, device="meta")
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
