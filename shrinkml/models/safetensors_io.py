"""Save and load PyTorch state dicts as safetensors, safely and (for pruned models) compactly.

* ``save_state_dict`` writes atomically and stores mostly-zero tensors as their nonzero values plus
  a 1-bit-per-element mask, so magnitude pruning makes the file on disk smaller. Other tools see
  the ``{name}::values`` / ``{name}::mask`` pair; ``load_state_dict`` turns it back into the exact
  dense tensor (``torch.equal``; -0.0 is stored as a zero and comes back as +0.0).
* ``load_state_dict`` never unpickles: pickle and ``torch.save`` files are refused with a fix.
* ``fit_module_to_state_dict`` resizes a freshly built model's layers to the shapes of a state
  dict saved after structured pruning, so the user's factory can rebuild the pruned model.

>>> summary = save_state_dict(model.state_dict(), "model.safetensors")  # doctest: +SKIP
>>> model = fit_module_to_state_dict(build_model(), state := load_state_dict("model.safetensors"))  # doctest: +SKIP
>>> model.load_state_dict(state, strict=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shrinkml.atomic import atomic_path
from shrinkml.errors import InputError, brief
from shrinkml.untrusted import parse_json

SPARSE_METADATA_KEY = "shrinkml.sparse"
_VALUES, _MASK = "::values", "::mask"
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# The dtypes an encoded tensor may declare, by the name save_state_dict writes. The dense tensor is
# rebuilt by scattering the values' bits as same-width integers (below), which works for every one
# of these (plain masked assignment is not implemented for uint16 or float8 on CPU).
_SPARSE_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                  torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                  torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
}
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CONVERT_FIX = (
    "convert it once in an environment where you trust the file: "
    "python -c \"import torch, safetensors.torch; safetensors.torch.save_file("
    "torch.load('PATH', weights_only=True), 'model.safetensors')\""
)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # the names _SPARSE_DTYPES is keyed by


def _encodable(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 0 and tensor.dtype in _SPARSE_DTYPES.values()


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> dict:
    """Write ``state_dict`` to ``path`` as safetensors, atomically; mostly-zero tensors bitmask-encoded.

    A tensor is encoded when ``nonzeros * itemsize + ceil(numel / 8)`` bytes is less than its dense
    size (below ~97% density for float32, ~88% for fp16). Shared and non-contiguous tensors are
    copied, so tied weights are written twice (safetensors has no aliasing). Returns
    ``{"tensors_encoded": int, "bytes": size of the written file}``.
    """
    metadata = dict(metadata or {})
    if SPARSE_METADATA_KEY in metadata:
        raise InputError(
            "the metadata key is reserved",
            where=f"save_state_dict(metadata={{{SPARSE_METADATA_KEY!r}: ...}})",
            expected=f"metadata keys other than {SPARSE_METADATA_KEY!r}",
            found=SPARSE_METADATA_KEY,
            fix="rename the key",
        )
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict] = {}
    seen_storage: set[int] = set()
    for name, tensor in state_dict.items():
        if "::" in name:
            raise InputError(
                "a state dict key contains '::', which shrinkml uses for encoded tensors",
                where=f"state dict key {name!r}",
                expected="keys without '::'",
                found=name,
                fix="rename the parameter or buffer",
            )
        if not isinstance(tensor, torch.Tensor):
            raise InputError(
                "a state dict value is not a tensor",
                where=f"state dict key {name!r}",
                expected="torch.Tensor values (safetensors stores tensors only)",
                found=type(tensor).__name__,
                fix="drop the entry, or put the value into metadata as a string",
            )
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in seen_storage and tensor.numel() > 0
        seen_storage.add(storage.data_ptr())
        if shared or not tensor.is_contiguous() or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.contiguous().clone()
        if _encodable(tensor):
            flat = tensor.reshape(-1)
            mask = flat != 0  # by value: -0.0 (left by weight * mask pruning) is a zero too
            n_values = int(mask.sum())
            if n_values * tensor.element_size() + (flat.numel() + 7) // 8 < flat.numel() * tensor.element_size():
                tensors[name + _VALUES] = flat[mask].contiguous()
                tensors[name + _MASK] = torch.from_numpy(np.packbits(mask.numpy()))
                sparse[name] = {"shape": list(tensor.shape), "dtype": _name(tensor.dtype)}
                continue
        tensors[name] = tensor
    if sparse:
        metadata[SPARSE_METADATA_KEY] = json.dumps(sparse, sort_keys=True)

    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or None)
    return {"tensors_encoded": len(sparse), "bytes": Path(path).stat().st_size}


def _read_header(path: Path) -> dict | None:
    """The safetensors JSON header, or None when the file does not have one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(_MAX_HEADER_BYTES, size - 8):
            return None
        raw = f.read(n)
    if not raw.startswith(b"{"):
        return None
    try:
        header = parse_json(raw.decode("utf-8"))
    except ValueError:  # not UTF-8, not JSON, or nested absurdly deep
        return None
    return header if isinstance(header, dict) else None


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ``InputError`` unless ``path`` is a readable safetensors file. Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "the weights file does not exist" if not path.exists() else "the weights path is not a file",
            where=str(path),
            expected="a .safetensors file",
            found="nothing at that path" if not path.exists() else "a folder",
            fix="check the path (relative paths are resolved from the current folder)",
        )
    if _read_header(path) is not None:
        return
    with path.open("rb") as f:
        head = f.read(4)
    # Pickle protocol 2+ opens with 0x80 and the protocol number; torch.save writes a zip archive.
    if (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5) or head.startswith(b"PK\x03\x04"):
        raise InputError(
            "this looks like a pickle / torch.save file; shrinkml does not unpickle untrusted files",
            where=str(path),
            expected="a safetensors file",
            found="a pickle" if head[:1] == b"\x80" else "a zip archive (torch.save format)",
            fix=_CONVERT_FIX.replace("PATH", str(path)),
        )
    raise InputError(
        "the safetensors header is corrupt or missing",
        where=str(path),
        expected="an 8-byte little-endian header length followed by a JSON header",
        found=f"{path.stat().st_size} bytes starting with {head!r}",
        fix="write the file again with safetensors.torch.save_file, or check that the download finished",
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict, turning bitmask-encoded tensors back into dense ones exactly."""
    check_safetensors_file(path)
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise InputError(
            "the safetensors file cannot be read",
            where=str(path),
            expected="a complete, valid safetensors file",
            found=f"{type(exc).__name__}: {exc}",
            fix="write the file again, or check that the download finished",
        ) from exc
    # The safetensors library checks every stored tensor against the file's size; the encoding's
    # metadata is shrinkml's own, so its declared shapes are checked here before anything is allocated.
    state = {name: t for name, t in raw.items() if not name.endswith((_VALUES, _MASK))}
    for name, info in _sparse_metadata(metadata.get(SPARSE_METADATA_KEY), path).items():
        state[name] = _decode_sparse(name, info, raw, path)
    return state


def _sparse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    try:
        sparse = {} if text is None else parse_json(text)
    except ValueError as exc:
        raise InputError(
            f"the {SPARSE_METADATA_KEY!r} metadata is not valid JSON ({getattr(exc, 'msg', exc)})",
            where=str(path),
            fix="write the file again with shrinkml's save_state_dict",
        ) from None
    if not isinstance(sparse, dict):
        raise InputError(
            f"the {SPARSE_METADATA_KEY!r} metadata is not a mapping",
            where=str(path),
            expected='{"name": {"shape": [...], "dtype": "float32"}, ...}',
            found=brief(sparse),
            fix="write the file again with shrinkml's save_state_dict",
        )
    return sparse


def _decode_sparse(name: str, info: Any, raw: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    """The dense tensor of the ``{name}::values`` / ``{name}::mask`` pair described by ``info``."""

    def inconsistent(found: str, expected: str | None = None) -> InputError:
        return InputError(
            "an encoded tensor in the safetensors file is inconsistent",
            where=f"{path}, tensor {brief(name)}",
            expected=expected or f"a shape of non-negative ints, a mask ({_MASK}) of one bit per element"
            f" and one value ({_VALUES}) of the dtype per set bit",
            found=found,
            fix="write the file again with shrinkml's save_state_dict",
        )

    shape, dtype_name = (info.get("shape"), info.get("dtype")) if isinstance(info, dict) else (None, None)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise inconsistent(f"shape {brief(shape)}")
    if not isinstance(dtype_name, str) or dtype_name not in _SPARSE_DTYPES:
        raise inconsistent(f"dtype {brief(dtype_name)}", expected="a dtype of " + ", ".join(_SPARSE_DTYPES))
    dtype = _SPARSE_DTYPES[dtype_name]
    values, packed = raw.get(name + _VALUES), raw.get(name + _MASK)
    if values is None or packed is None:
        raise inconsistent(f"no {name + (_VALUES if values is None else _MASK)!r} tensor")
    # The mask is read from the file, so it bounds what the shape may claim: one bit per element.
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise inconsistent(f"shape {shape} ({numel:,} elements) with a {_name(packed.dtype)} mask of shape"
                           f" {list(packed.shape)} (needs {(numel + 7) // 8:,} bytes)")
    mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
    n_set = int(mask.sum())
    if values.dtype != dtype or values.dim() != 1 or values.numel() != n_set:
        raise inconsistent(f"{values.numel():,} {_name(values.dtype)} values for {n_set:,} set mask bits of {dtype_name}")
    # scatter the values' bits as integers of the same width: exact for every dtype, NaN payloads too
    as_int = _SAME_WIDTH_INT[dtype.itemsize]
    dense = torch.zeros(numel, dtype=as_int)
    dense[mask] = values.view(as_int)
    return dense.view(dtype).reshape(shape)


def _fitted_shapes(module: nn.Module, shapes: dict[str, torch.Size]) -> dict[str, int] | None:
    """New size attributes of ``module`` for its state dict ``shapes``; None if its type is unsupported."""
    weight = shapes.get("weight")
    if isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        groups = module.groups
        depthwise = groups > 1 and groups == module.in_channels
        if module.transposed:  # weight: [in, out / groups, *kernel]
            new_in = weight[0]
            new_groups = new_in if depthwise else groups
            new_out = weight[1] * new_groups
        else:  # weight: [out, in / groups, *kernel]
            new_out = weight[0]
            new_groups = new_out * groups // module.out_channels if depthwise else groups
            new_in = weight[1] * new_groups
        return {"in_channels": new_in, "out_channels": new_out, "groups": new_groups}
    if isinstance(module, nn.Linear) and weight is not None:
        return {"out_features": weight[0], "in_features": weight[1]}
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        first = weight if weight is not None else shapes.get("running_mean")
        if first is None:
            return None
        key = "num_channels" if isinstance(module, nn.GroupNorm) else "num_features"
        return {key: first[0]}
    if isinstance(module, nn.LayerNorm) and weight is not None:
        return {"normalized_shape": tuple(weight)}
    if isinstance(module, nn.Embedding) and weight is not None:
        return {"num_embeddings": weight[0], "embedding_dim": weight[1]}
    return None


def fit_module_to_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Resize ``module``'s layers in place to the shapes in ``state_dict``; return ``module``.

    For a model rebuilt by the user's factory (full width) and a state dict saved after
    ``prune.channels``: Conv (groups kept, depthwise followed), Linear, BatchNorm, GroupNorm,
    LayerNorm and Embedding get empty tensors of the saved shapes and matching size attributes, so
    ``module.load_state_dict(state_dict, strict=True)`` then works. A layer of another type whose
    shapes differ raises ``InputError`` naming it. Keys missing on either side are left for
    ``load_state_dict(strict=True)`` to report.
    """
    for prefix, layer in module.named_modules():
        own = {**dict(layer.named_parameters(recurse=False)), **dict(layer.named_buffers(recurse=False))}
        key = (prefix + ".") if prefix else ""
        shapes = {name: state_dict[key + name].shape for name in own if key + name in state_dict}
        differing = {n: s for n, s in shapes.items() if tuple(own[n].shape) != tuple(s)}
        if not differing:
            continue
        new_sizes = _fitted_shapes(layer, shapes)
        if new_sizes is None:
            name, found = next(iter(differing.items()))
            raise InputError(
                f"cannot resize a {type(layer).__name__} layer to the saved weights",
                where=f"layer {prefix or '(root)'!r}, tensor {key + name!r}",
                expected=f"shape {list(own[name].shape)} (as the model factory builds it)",
                found=f"shape {list(found)} in the state dict",
                fix="build the model with the saved sizes, or prune only Conv/Linear/norm/Embedding layers",
            )
        groups = new_sizes.get("groups")
        channels = (new_sizes.get("in_channels", 0), new_sizes.get("out_channels", 0))
        if groups is not None and (groups < 1 or any(c % groups for c in channels)):
            raise InputError(
                "the saved convolution shape does not divide into the layer's groups",
                where=f"layer {prefix!r}",
                expected=f"channel counts divisible by groups={new_sizes['groups']}",
                found=f"weight shape {list(shapes['weight'])}",
                fix="rebuild the layer with matching groups in the model factory",
            )
        for attr, value in new_sizes.items():
            setattr(layer, attr, value)
        for name, shape in shapes.items():
            old = own[name]
            if tuple(old.shape) == tuple(shape):
                continue
            fresh = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(layer, name, nn.Parameter(fresh, requires_grad=old.requires_grad))
            else:
                layer.register_buffer(name, fresh, persistent=name not in layer._non_persistent_buffers_set)
    return module
