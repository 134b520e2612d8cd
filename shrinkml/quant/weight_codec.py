"""Group-wise low-bit weight codes and their ONNX Runtime deployment (``MatMulNBits``,
``GatherBlockQuantized``).

A weight ``W`` of shape ``(N, K)`` (``nn.Linear`` layout: out x in) is cut along ``K`` into groups of
``group_size`` elements; each group has a float32 scale and, when asymmetric, an integer zero point.
The arithmetic copies ONNX Runtime's own blockwise quantizer (MLAS ``BlockwiseQuantizer``), so that
round-to-nearest codes computed here are the codes ``MatMulNBitsQuantizer`` would write:

- asymmetric: the group range is widened to include 0; ``scale = (max - min) / (2**bits - 1)``,
  ``zero_point = round(-min / scale)`` (clamped to the code range);
- symmetric: ``scale = -m / 2**(bits-1)`` where ``m`` is the group's value of largest magnitude
  (the scale can be negative: the larger half of the range then maps onto the wider negative side
  of the code range), and the zero point is the runtime's default ``2**(bits-1)``;
- ``code = clamp(roundf(w * (1 / scale) + zero_point), 0, 2**bits - 1)`` with C ``roundf`` (ties
  away from zero, unlike ``QuantizeLinear``'s ties-to-even); ``w' = (code - zero_point) * scale``.

Packing (``MatMulNBits`` input ``B``): ``uint8 [N, n_blocks, group_size * bits / 8]``, codes in
``K`` order, two 4-bit codes per byte with the lower ``K`` index in the low nibble. Zero points:
``uint8 [N, ceil(n_blocks * bits / 8)]``, same nibble order, a missing last nibble padded with the
default 8. Scales: ``float32 [N, n_blocks]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from shrinkml.quant.blocks import check_group_size  # torch-free, for recipe validation; used here too

MS_DOMAIN = "com.microsoft"
SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, found {bits}")
    return bits


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: to nearest, ties away from zero (exact: ``x - trunc(x)`` has no rounding)."""
    whole = torch.trunc(x)
    frac = x - whole
    return whole + torch.where(frac.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def group_params(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group (last axis), ONNX Runtime's rules; float32 / float32.

    The zero point comes back as a float holding an integer (the symmetric default ``2**(bits-1)``
    when ``symmetric``), ready for :func:`quantize_codes`.
    """
    groups = groups.float()
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    mid = float(2 ** (bits - 1))
    if symmetric:
        largest = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = -largest / mid
        return scale, torch.full_like(scale, mid)
    max_code = float(2**bits - 1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi - lo) / max_code
    zero_fp = torch.where(scale != 0, 0.0 - lo / torch.where(scale != 0, scale, 1.0), lo)
    zero = round_half_away(zero_fp.clamp(0.0, max_code))
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` (float32) with a broadcastable scale and zero point, as uint8."""
    reciprocal = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), torch.zeros_like(scale))
    q = round_half_away(w.float() * reciprocal + zero).clamp(0.0, float(2**bits - 1))
    return q.to(torch.uint8)


@dataclass(frozen=True)
class GroupQuantized:
    """A weight ``(N, K)`` as group-wise integer codes: what ``MatMulNBits`` stores.

    ``codes``: uint8 ``(N, K)`` (one code per element, unpacked); ``scales``: float32
    ``(N, n_blocks)``; ``zero_points``: uint8 ``(N, n_blocks)``, or None when symmetric (the runtime
    then uses ``2**(bits-1)``).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return -(-self.codes.shape[1] // self.group_size)

    def _zero_float(self) -> torch.Tensor:
        if self.zero_points is None:
            return torch.full_like(self.scales, float(2 ** (self.bits - 1)))
        return self.zero_points.float()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(N, K)`` the runtime computes with: ``(code - zero) * scale``."""
        n, k = self.shape
        pad = self.n_blocks * self.group_size - k
        codes = torch.nn.functional.pad(self.codes.float(), (0, pad)).view(n, self.n_blocks, self.group_size)
        w = (codes - self._zero_float().unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.reshape(n, -1)[:, :k].contiguous()

    def packed_codes(self) -> np.ndarray:
        """``MatMulNBits`` input B: uint8 ``(N, n_blocks, group_size * bits / 8)``."""
        n, k = self.shape
        padded = np.zeros((n, self.n_blocks * self.group_size), np.uint8)
        padded[:, :k] = self.codes.numpy()
        return pack_rows(padded, self.bits).reshape(n, self.n_blocks, -1)

    def packed_zero_points(self) -> np.ndarray | None:
        """``MatMulNBits`` zero points: uint8 ``(N, ceil(n_blocks * bits / 8))``, or None."""
        if self.zero_points is None:
            return None
        return pack_rows(self.zero_points.numpy(), self.bits, fill=2 ** (self.bits - 1))

    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points as stored in the ONNX file."""
        zp = self.packed_zero_points()
        return self.packed_codes().nbytes + self.scales.numel() * 4 + (0 if zp is None else zp.nbytes)


def pack_rows(codes: np.ndarray, bits: int, *, fill: int = 0) -> np.ndarray:
    """Pack each row of uint8 ``codes`` (values < 2**bits) into bytes, lower index in the low bits.

    An odd row length (4 bits) is padded with ``fill``.
    """
    _check_bits(bits)
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (1,), fill, np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_rows(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: the first ``length`` codes of each row."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :length].copy()
    codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes[..., :length]


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N, K)`` -> ``(N, n_blocks, group_size)``, zero-padded (zeros never widen a range that
    already includes 0, so padding changes no scale)."""
    n, k = weight.shape
    pad = (-k) % group_size
    return torch.nn.functional.pad(weight.float(), (0, pad)).view(n, -1, group_size)


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int, symmetric: bool) -> GroupQuantized:
    """Round-to-nearest group quantization of a ``(N, K)`` weight (ONNX Runtime's arithmetic)."""
    _check_bits(bits)
    check_group_size(group_size)
    with torch.no_grad():
        n, k = weight.shape
        groups = _grouped(weight.detach(), group_size)
        scale, zero = group_params(groups, bits, symmetric)
        codes = quantize_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(n, -1)[:, :k]
    return GroupQuantized(
        codes=codes.contiguous(),
        scales=scale.contiguous(),
        zero_points=None if symmetric else zero.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
    )


# --- ONNX graph rewriting ------------------------------------------------------------------------


def matmul_nbits_node(
    activation: str, output: str, q: GroupQuantized, *, prefix: str, node_name: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A ``MatMulNBits`` node computing ``activation @ W'^T`` and its initializers."""
    n, k = q.shape
    inits = [
        numpy_helper.from_array(q.packed_codes(), f"{prefix}_Q{q.bits}"),
        numpy_helper.from_array(q.scales.numpy().astype(np.float32), f"{prefix}_scales"),
    ]
    zero_points = q.packed_zero_points()
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, f"{prefix}_zero_points"))
    node = helper.make_node(
        "MatMulNBits", [activation] + [t.name for t in inits], [output], name=node_name, domain=MS_DOMAIN,
        K=k, N=n, bits=q.bits, block_size=q.group_size,
    )
    return node, inits


def gather_block_quantized_node(
    indices: str, output: str, q: GroupQuantized, *, prefix: str, node_name: str, gather_axis: int = 0
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A ``GatherBlockQuantized`` node looking rows up in an embedding table ``(vocab, hidden)``
    stored as group codes along ``hidden`` (uint8 data with the ``bits`` attribute)."""
    vocab, hidden = q.shape
    if hidden % q.group_size:
        raise ValueError(f"the embedding width ({hidden}) must be a multiple of group_size ({q.group_size})")
    inits = [
        numpy_helper.from_array(pack_rows(q.codes.numpy(), q.bits), f"{prefix}_Q{q.bits}"),
        numpy_helper.from_array(q.scales.numpy().astype(np.float32), f"{prefix}_scales"),
    ]
    inputs = [inits[0].name, indices, inits[1].name]
    zero_points = q.packed_zero_points()
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, f"{prefix}_zero_points"))
        inputs.append(inits[-1].name)
    node = helper.make_node(
        "GatherBlockQuantized", inputs, [output], name=node_name, domain=MS_DOMAIN,
        gather_axis=gather_axis, quantize_axis=1, block_size=q.group_size, bits=q.bits,
    )
    return node, inits


def ensure_ms_domain(model: onnx.ModelProto) -> None:
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def remove_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> list[str]:
    """Drop the ``candidates`` initializers no node or graph output uses any more; their names."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    # subgraphs (If/Loop bodies) may capture outer initializers
    for node in model.graph.node:
        for attr in node.attribute:
            graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for g in graphs:
                used |= {name for sub in g.node for name in sub.input}
    removed = [t.name for t in model.graph.initializer if t.name in candidates and t.name not in used]
    keep = [t for t in model.graph.initializer if t.name not in set(removed)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for name in removed:  # older exporters list initializers as graph inputs too
        for i, value in enumerate(model.graph.input):
            if value.name == name:
                del model.graph.input[i]
                break
    return removed
