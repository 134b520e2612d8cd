"""llama.cpp's block formats in numpy: codes that shrinkml chooses, stored the way llama.cpp stores them.

A GGUF weight of shape ``(rows, cols)`` is stored row by row, each row cut into blocks along
``cols``. One block holds integer codes and the parameters that turn them back into weights:

=======  =====  =====  ====================================================================
format   block  bytes  value of code ``q`` (parameters stored as fp16 unless said)
=======  =====  =====  ====================================================================
Q8_0     32     34     ``d * q``, q signed 8-bit in [-128, 127]
Q4_0     32     18     ``d * (q - 8)``, q in [0, 15]
Q4_1     32     20     ``d * q + m``, q in [0, 15]
Q5_0     32     22     ``d * (q - 16)``, q in [0, 31]
Q5_1     32     24     ``d * q + m``, q in [0, 31]
Q6_K     256    210    ``d * sc * (q - 32)``, q in [0, 63], one signed 8-bit ``sc`` per 16 weights
Q4_K     256    144    ``d * sc * q - dmin * mn``, q in [0, 15], 6-bit ``sc``/``mn`` per 32 weights
=======  =====  =====  ====================================================================

:class:`BlockCodes` holds one weight's codes and parameters exactly as stored; :func:`pack` lays
them out byte for byte as llama.cpp does (what ``gguf.GGUFWriter.add_tensor(..., raw_dtype=qtype)``
takes), :func:`unpack` reads such bytes back and :func:`dequantize` gives the float32 weights
llama.cpp computes (``gguf.quants.dequantize`` of the packed bytes, bit for bit). Codes come from
:func:`quantize_rtn` (llama.cpp's reference round-to-nearest quantizers, ``quantize_row_*_ref``) or
from a quantizer that chose them itself (GPTQ, AWQ) through :func:`from_group_params`, whose
per-group scales must survive fp16 storage: :func:`round_params_fp16` says which do.

>>> codes = quantize_rtn(np.ones((2, 64), np.float32), "Q8_0")  # d = 1/127, stored in fp16
>>> pack(codes).shape, int(codes.codes[0, 0]), float(dequantize(codes)[0, 0])
((2, 68), 127, 0.99993896484375)

This module needs only numpy (the ``gguf`` package is imported for :attr:`BlockFormat.qtype` only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

QK_K = 256  # weights per K-quant super-block
GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp: a group whose largest |weight| is below this is all zero

_F16 = np.dtype("<f2")  # GGUF is little-endian: fp16 parameters are stored as such
_F32 = np.float32


@dataclass(frozen=True)
class BlockFormat:
    """One of llama.cpp's block formats (see the module's table).

    ``type_id`` is its ``ggml_type`` (``gguf.GGMLQuantizationType``); a block of ``block_size``
    weights takes ``type_size`` bytes; ``group_size`` weights share one scale (the sub-block of a
    K-quant); codes lie in ``[code_min, code_max]`` and ``offset`` is subtracted before scaling;
    ``has_min``: the format adds an offset (``m``, or ``dmin * mn``) instead of centring codes.
    """

    name: str
    type_id: int
    block_size: int
    type_size: int
    bits: int
    group_size: int
    offset: int
    has_min: bool
    code_min: int
    code_max: int

    @property
    def super_block(self) -> bool:
        """True for the K-quants, whose 256-weight super-blocks hold two levels of scales."""
        return self.block_size == QK_K

    @property
    def qtype(self) -> Any:
        """The ``gguf.GGMLQuantizationType`` of this format (imports ``gguf``)."""
        import gguf

        return gguf.GGMLQuantizationType(self.type_id)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, parameters included (Q4_0: 4.5)."""
        return 8 * self.type_size / self.block_size


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("Q8_0", 8, 32, 34, 8, 32, 0, False, -128, 127),
        BlockFormat("Q4_0", 2, 32, 18, 4, 32, 8, False, 0, 15),
        BlockFormat("Q4_1", 3, 32, 20, 4, 32, 0, True, 0, 15),
        BlockFormat("Q5_0", 6, 32, 22, 5, 32, 16, False, 0, 31),
        BlockFormat("Q5_1", 7, 32, 24, 5, 32, 0, True, 0, 31),
        BlockFormat("Q6_K", 14, QK_K, 210, 6, 16, 32, False, 0, 63),
        BlockFormat("Q4_K", 12, QK_K, 144, 4, 32, 0, True, 0, 15),
    )
}
_BY_ID = {f.type_id: f for f in FORMATS.values()}
_BLOCK_32 = [name for name, f in FORMATS.items() if not f.super_block]

# What llama.cpp's quantize tool writes instead when a row does not split into 256-weight super-blocks.
LLAMA_CPP_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def block_format(fmt: str | int | BlockFormat) -> BlockFormat:
    """The :class:`BlockFormat` for a name (``"Q4_0"``, any case), a ``ggml_type`` number or a
    ``gguf.GGMLQuantizationType``; ``ValueError`` for any other."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str):
        found = FORMATS.get(fmt.upper())
    elif isinstance(fmt, (int, np.integer)):
        found = _BY_ID.get(int(fmt))
    else:
        found = None
    if found is None:
        name = getattr(fmt, "name", fmt)
        raise ValueError(f"unsupported GGUF block format {name!r}: shrinkml writes {', '.join(FORMATS)}")
    return found


def fits(fmt: str | int | BlockFormat, cols: int) -> bool:
    """Whether a row of ``cols`` weights splits into whole blocks of ``fmt`` (576 fits Q4_0, not Q4_K)."""
    f = block_format(fmt)
    return cols > 0 and cols % f.block_size == 0


def check_cols(fmt: str | int | BlockFormat, cols: int, *, name: str = "the weight") -> BlockFormat:
    """``fmt``'s :class:`BlockFormat` if rows of ``cols`` weights fit it, else a ``ValueError`` that
    says why and what llama.cpp would use instead."""
    f = block_format(fmt)
    if fits(f, cols):
        return f
    text = (f"{name} has rows of {cols} weights, which {f.name} cannot store: its rows are cut into blocks of"
            f" {f.block_size} weights and {cols} is not a multiple of {f.block_size}")
    if f.super_block:
        text += (f" (a K-quant super-block is {QK_K} weights; llama.cpp's quantize writes"
                 f" {LLAMA_CPP_FALLBACK[f.name]} for such a tensor, use that or another 32-block format)")
    raise ValueError(text)


def bytes_per_weight(fmt: str | int | BlockFormat) -> float:
    """Stored bytes per weight, parameters included (Q8_0: 34/32)."""
    f = block_format(fmt)
    return f.type_size / f.block_size


def packed_shape(fmt: str | int | BlockFormat, rows: int, cols: int) -> tuple[int, int]:
    """The uint8 shape :func:`pack` returns for a ``(rows, cols)`` weight (gguf's
    ``quant_shape_to_byte_shape``)."""
    f = check_cols(fmt, cols)
    return rows, cols // f.block_size * f.type_size


def packed_nbytes(fmt: str | int | BlockFormat, rows: int, cols: int) -> int:
    """Bytes a ``(rows, cols)`` weight takes in ``fmt``."""
    r, c = packed_shape(fmt, rows, cols)
    return r * c


# ----------------------------------------------------------------------------------------------
# The codes of one weight
# ----------------------------------------------------------------------------------------------


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def _as_f16(value: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as little-endian fp16 of ``shape``, refused if it is not exactly fp16."""
    a = np.asarray(value)
    if a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, found {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} must be floating point (fp16 as stored), found {a.dtype}")
    h = a.astype(_F16)
    with np.errstate(invalid="ignore"):
        same = np.array_equal(h.astype(np.float64), a.astype(np.float64), equal_nan=True)
    if not same:
        raise ValueError(f"{what} must hold fp16 values (they are stored as fp16); round them first")
    return h


def _as_ints(value: Any, what: str, shape: tuple[int, ...], lo: int, hi: int, dtype: Any) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, found {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{what} must be integers, found {a.dtype}")
    if a.size and (int(a.min()) < lo or int(a.max()) > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], found values in [{int(a.min())}, {int(a.max())}]")
    return a.astype(dtype)


@dataclass(frozen=True, eq=False)
class BlockCodes:
    """A ``(rows, cols)`` weight in one block format, as the format stores it.

    ``codes``: one integer per weight, ``(rows, cols)``, as stored (uint8, or int8 for Q8_0).
    ``d``: fp16 scale per block ``(rows, cols // 32)``, per super-block ``(rows, cols // 256)`` for
    the K-quants. ``m``: fp16 offset per block (Q4_1, Q5_1). ``dmin``: fp16 super-block scale of the
    mins (Q4_K). ``sub_scales``: per sub-block, ``(rows, cols // 256, 16)`` int8 for Q6_K,
    ``(rows, cols // 256, 8)`` 6-bit for Q4_K. ``sub_mins``: Q4_K's 6-bit mins, like its sub_scales.
    Fields a format has not are None. Arrays are validated and kept as read-only copies.
    """

    fmt: BlockFormat
    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None
    dmin: np.ndarray | None = None
    sub_scales: np.ndarray | None = None
    sub_mins: np.ndarray | None = None

    def __post_init__(self) -> None:
        f = block_format(self.fmt)
        codes = np.asarray(self.codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be 2-D (rows, cols), found shape {codes.shape}")
        rows, cols = codes.shape
        check_cols(f, cols, name="the codes")
        codes = _as_ints(codes, "codes", (rows, cols), f.code_min, f.code_max, np.int8 if f.code_min < 0 else np.uint8)
        nb = cols // f.block_size
        fields: dict[str, Any] = {"fmt": f, "codes": codes, "d": _as_f16(self.d, "d", (rows, nb))}
        wanted = {"m": f.has_min and not f.super_block, "dmin": f.name == "Q4_K",
                  "sub_scales": f.super_block, "sub_mins": f.name == "Q4_K"}
        for key, needed in wanted.items():
            given = getattr(self, key)
            if needed and given is None:
                raise ValueError(f"{f.name} needs {key}")
            if not needed and given is not None:
                raise ValueError(f"{f.name} has no {key}; pass None")
        if wanted["m"]:
            fields["m"] = _as_f16(self.m, "m", (rows, nb))
        if f.name == "Q4_K":
            fields["dmin"] = _as_f16(self.dmin, "dmin", (rows, nb))
            fields["sub_scales"] = _as_ints(self.sub_scales, "sub_scales", (rows, nb, 8), 0, 63, np.uint8)
            fields["sub_mins"] = _as_ints(self.sub_mins, "sub_mins", (rows, nb, 8), 0, 63, np.uint8)
        elif f.name == "Q6_K":
            fields["sub_scales"] = _as_ints(self.sub_scales, "sub_scales", (rows, nb, 16), -128, 127, np.int8)
        for key, value in fields.items():
            object.__setattr__(self, key, _frozen(value) if isinstance(value, np.ndarray) else value)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight."""
        return packed_nbytes(self.fmt, *self.shape)

    def take_rows(self, index: Any) -> BlockCodes:
        """These codes with their rows reordered (or selected): row ``i`` of the result is row
        ``index[i]`` here, parameters included (blocks lie along rows, so rows move whole)."""
        index = np.asarray(index)
        kw = {key: None if getattr(self, key) is None else getattr(self, key)[index]
              for key in ("m", "dmin", "sub_scales", "sub_mins")}
        return BlockCodes(self.fmt, self.codes[index], self.d[index], **kw)

    @staticmethod
    def concat_rows(parts: list[BlockCodes]) -> BlockCodes:
        """The row blocks ``parts`` (one format, one width) stacked into one weight's codes."""
        if len({p.fmt.name for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("row blocks to stack must share their format and width")
        if len(parts) == 1:
            return parts[0]
        kw = {key: None if getattr(parts[0], key) is None else np.concatenate([getattr(p, key) for p in parts])
              for key in ("m", "dmin", "sub_scales", "sub_mins")}
        return BlockCodes(parts[0].fmt, np.concatenate([p.codes for p in parts]),
                          np.concatenate([p.d for p in parts]), **kw)

    def same_as(self, other: BlockCodes) -> bool:
        """Whether ``other`` holds the same format, codes and parameters, bit for bit."""
        if self.fmt != other.fmt:
            return False
        for key in ("codes", "d", "m", "dmin", "sub_scales", "sub_mins"):
            a, b = getattr(self, key), getattr(other, key)
            if (a is None) != (b is None):
                return False
            if a is not None and (a.shape != b.shape or a.tobytes() != b.tobytes()):
                return False
        return True


# ----------------------------------------------------------------------------------------------
# Dequantize: the float32 weights llama.cpp computes, in its order of operations
# ----------------------------------------------------------------------------------------------


def dequantize(c: BlockCodes) -> np.ndarray:
    """The float32 ``(rows, cols)`` weight llama.cpp's ``dequantize_row_*`` gives for ``c``:
    fp16 parameters widened to float32, then multiplied (and added) in llama.cpp's order, so the
    result equals ``gguf.quants.dequantize(pack(c), qtype)`` bit for bit."""
    f = c.fmt
    rows, cols = c.shape
    if f.super_block:
        ns = cols // QK_K
        d = c.d.astype(_F32)[..., None]  # (rows, ns, 1)
        sc = c.sub_scales.astype(_F32)
        n_sub = QK_K // f.group_size
        q = c.codes.reshape(rows, ns, n_sub, f.group_size).astype(_F32)
        if f.name == "Q6_K":  # y = d * sc * (q - 32)
            scale = (d * sc)[..., None]
            out = scale * (q - _F32(f.offset))
        else:  # Q4_K: y = (d * sc) * q - dmin * mn
            scale = (d * sc)[..., None]
            low = (c.dmin.astype(_F32)[..., None] * c.sub_mins.astype(_F32))[..., None]
            out = scale * q - low
        return out.reshape(rows, cols)
    nb = cols // f.block_size
    d = c.d.astype(_F32)[..., None]
    q = c.codes.reshape(rows, nb, f.block_size).astype(np.int16)
    if f.has_min:  # Q4_1, Q5_1: y = d * q + m
        out = d * q.astype(_F32) + c.m.astype(_F32)[..., None]
    else:  # Q8_0, Q4_0, Q5_0: y = d * (q - offset)
        out = d * (q - f.offset).astype(_F32)
    return out.reshape(rows, cols)


# ----------------------------------------------------------------------------------------------
# Pack and unpack: llama.cpp's byte layout
# ----------------------------------------------------------------------------------------------


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    """fp16 values ``(..., )`` as their two little-endian bytes ``(..., 2)``."""
    return np.ascontiguousarray(a.astype(_F16)).view(np.uint8).reshape(*a.shape, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def pack(c: BlockCodes) -> np.ndarray:
    """``c`` in llama.cpp's byte layout: uint8 ``(rows, cols // block_size * type_size)``, the
    array ``gguf.GGUFWriter.add_tensor(name, packed, raw_dtype=c.fmt.qtype)`` writes as this tensor."""
    f = c.fmt
    rows, cols = c.shape
    nb = cols // f.block_size
    q = c.codes.view(np.uint8).reshape(rows, nb, f.block_size)
    d = _f16_bytes(c.d)
    if f.name == "Q8_0":  # d, qs[32]
        parts = [d, q]
    elif f.name in ("Q4_0", "Q4_1"):  # d, [m], qs[16]: weight j in the low nibble of byte j, j+16 in the high
        parts = [d] + ([_f16_bytes(c.m)] if f.has_min else []) + [_nibbles(q[..., :16], q[..., 16:])]
    elif f.name in ("Q5_0", "Q5_1"):  # d, [m], qh[4] (bit j = 5th bit of weight j), qs[16]
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")
        parts = [d] + ([_f16_bytes(c.m)] if f.has_min else []) + [qh, _nibbles(q[..., :16], q[..., 16:])]
    elif f.name == "Q6_K":  # ql[128], qh[64], scales[16], d
        ql, qh = [], []
        for half in (q[..., :128], q[..., 128:]):
            a, b, e, g = half[..., 0:32], half[..., 32:64], half[..., 64:96], half[..., 96:128]
            ql += [_nibbles(a, e), _nibbles(b, g)]
            qh.append((a >> 4) | ((b >> 4) << 2) | ((e >> 4) << 4) | ((g >> 4) << 6))
        parts = ql + qh + [c.sub_scales.view(np.uint8), d]
    elif f.name == "Q4_K":  # d, dmin, scales[12], qs[128]
        ls, lm = c.sub_scales, c.sub_mins
        scales = np.concatenate([
            ls[..., :4] | ((ls[..., 4:] >> 4) << 6),
            lm[..., :4] | ((lm[..., 4:] >> 4) << 6),
            (ls[..., 4:] & 0x0F) | ((lm[..., 4:] & 0x0F) << 4),
        ], axis=-1)
        qs = [_nibbles(q[..., 64 * k: 64 * k + 32], q[..., 64 * k + 32: 64 * k + 64]) for k in range(4)]
        parts = [d, _f16_bytes(c.dmin), scales] + qs
    else:  # pragma: no cover  (FORMATS lists only the formats above)
        raise ValueError(f"no packer for {f.name}")
    blocks = np.concatenate([p.astype(np.uint8, copy=False) for p in parts], axis=-1)
    assert blocks.shape[-1] == f.type_size, (f.name, blocks.shape)
    return blocks.reshape(rows, nb * f.type_size)


def unpack(data: np.ndarray, fmt: str | int | BlockFormat) -> BlockCodes:
    """The :class:`BlockCodes` that :func:`pack` would turn into ``data``: uint8 bytes of shape
    ``(rows, row_bytes)`` (as ``gguf.GGUFReader`` gives a quantized 2-D tensor) or ``(row_bytes,)``."""
    f = block_format(fmt)
    raw = np.asarray(data)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.ndim == 1:
        raw = raw.reshape(1, -1)
    if raw.ndim != 2 or raw.shape[1] == 0 or raw.shape[1] % f.type_size:
        raise ValueError(f"{f.name} data must be (rows, a multiple of {f.type_size} bytes), found shape {raw.shape}")
    rows = raw.shape[0]
    nb = raw.shape[1] // f.type_size
    b = np.ascontiguousarray(raw).reshape(rows, nb, f.type_size)

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(b[..., lo:lo + 2]).view(_F16)[..., 0]

    def split(qs: np.ndarray) -> np.ndarray:  # 16 bytes -> 32 codes
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)

    kw: dict[str, Any] = {}
    if f.name == "Q8_0":
        d, q = f16(0), b[..., 2:].view(np.int8)
    elif f.name == "Q4_0":
        d, q = f16(0), split(b[..., 2:])
    elif f.name == "Q4_1":
        d, kw["m"], q = f16(0), f16(2), split(b[..., 4:])
    elif f.name in ("Q5_0", "Q5_1"):
        start = 2 if f.name == "Q5_0" else 4
        d = f16(0)
        if f.has_min:
            kw["m"] = f16(2)
        high = np.unpackbits(b[..., start:start + 4], axis=-1, bitorder="little")
        q = split(b[..., start + 4:]) | (high << 4)
    elif f.name == "Q6_K":
        ql, qh, sc = b[..., :128], b[..., 128:192], b[..., 192:208]
        halves = []
        for h in range(2):
            l0, l1, hb = ql[..., 64 * h: 64 * h + 32], ql[..., 64 * h + 32: 64 * h + 64], qh[..., 32 * h: 32 * h + 32]
            halves += [(l0 & 0x0F) | ((hb & 3) << 4), (l1 & 0x0F) | (((hb >> 2) & 3) << 4),
                       (l0 >> 4) | (((hb >> 4) & 3) << 4), (l1 >> 4) | (((hb >> 6) & 3) << 4)]
        q = np.concatenate(halves, axis=-1)
        d, kw["sub_scales"] = f16(208), sc.view(np.int8)
    elif f.name == "Q4_K":
        d, kw["dmin"] = f16(0), f16(2)
        s = b[..., 4:16]
        lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        kw["sub_scales"] = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
        kw["sub_mins"] = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
        qs = b[..., 16:]
        q = np.concatenate([split(qs[..., 32 * k: 32 * k + 32]) for k in range(4)], axis=-1)
    else:  # pragma: no cover
        raise ValueError(f"no unpacker for {f.name}")
    return BlockCodes(f, q.reshape(rows, nb * f.block_size), d, **kw)


# ----------------------------------------------------------------------------------------------
# Round-to-nearest: llama.cpp's reference quantizers (quantize_row_*_ref), float32 throughout
# ----------------------------------------------------------------------------------------------


def _weight_2d(weight: Any, f: BlockFormat) -> np.ndarray:
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"the weight must be 2-D (rows, cols), found shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"the weight must be floating point, found {w.dtype}")
    w = np.ascontiguousarray(w, dtype=_F32)
    check_cols(f, w.shape[1])
    if not np.isfinite(w).all():
        bad = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"the weight holds a non-finite value ({w[tuple(bad)]}) at row {bad[0]}, column {bad[1]}")
    return w


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (half away from zero), exact in float32 (``floor(a + 0.5)`` is not)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: the float32 magic-number rounding (half to even), bit for bit."""
    v = (x.astype(_F32, copy=False) + _F32(12582912.0)).astype(_F32, copy=False)
    return (v.view(np.int32) & 0x007FFFFF) - 0x00400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in float32, as a C loop does (``np.sum`` is pairwise)."""
    return np.add.accumulate(a, axis=-1, dtype=_F32)[..., -1]


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d).astype(_F32)


def _rtn_symmetric(x: np.ndarray, f: BlockFormat) -> BlockCodes:
    """Q4_0 / Q5_0: ``d = max / -2^(bits-1)`` where ``max`` is the weight of largest magnitude."""
    rows, cols = x.shape
    b = x.reshape(rows, -1, 32)
    half = 1 << (f.bits - 1)
    biggest = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    d = biggest / _F32(-half)
    q = np.trunc(b * _reciprocal_or_zero(d)[..., None] + _F32(half + 0.5))
    q = np.clip(q, 0, 2 * half - 1).astype(np.uint8)
    return BlockCodes(f, q.reshape(rows, cols), d.astype(_F16))


def _rtn_min(x: np.ndarray, f: BlockFormat) -> BlockCodes:
    """Q4_1 / Q5_1: ``m = min``, ``d = (max - min) / (2^bits - 1)``."""
    rows, cols = x.shape
    b = x.reshape(rows, -1, 32)
    top = (1 << f.bits) - 1
    lo, hi = b.min(axis=-1), b.max(axis=-1)
    d = (hi - lo) / _F32(top)
    q = np.trunc((b - lo[..., None]) * _reciprocal_or_zero(d)[..., None] + _F32(0.5))
    q = np.clip(q, 0, top).astype(np.uint8)
    return BlockCodes(f, q.reshape(rows, cols), d.astype(_F16), m=lo.astype(_F16))


def _rtn_q8_0(x: np.ndarray, f: BlockFormat) -> BlockCodes:
    """Q8_0: ``d = max|w| / 127``, codes ``roundf(w / d)``."""
    rows, cols = x.shape
    b = x.reshape(rows, -1, 32)
    d = np.abs(b).max(axis=-1) / _F32(127)
    q = _round_away(b * _reciprocal_or_zero(d)[..., None]).astype(np.int8)
    return BlockCodes(f, q.reshape(rows, cols), d.astype(_F16))


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qkx2_quants`` on each row of ``x`` (groups, n): a scale and min fit by
    weighted least squares over ``nstep + 1`` trial scales. Returns (scale, -min, codes)."""
    lo = np.minimum(x.min(axis=-1), _F32(0))
    hi = x.max(axis=-1)
    flat = hi == lo
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(nmax) / (hi - lo)
        scale = _F32(1) / iscale
        L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(_F32)
        diff = scale[:, None] * L + lo[:, None] - x
        best = _seqsum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (hi - lo)
            laux = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(_F32)
            wl = w * laux
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * laux), _seqsum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, _F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * laux + this_min[:, None] - x
            err = _seqsum(w * (diff * diff))
            better = (det > 0) & (err < best) & ~flat
            L = np.where(better[:, None], laux, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    L = np.where(flat[:, None], _F32(0), L)
    scale = np.where(flat, _F32(0), scale)
    return scale.astype(_F32), (-lo).astype(_F32), L.astype(np.uint8)


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on each row of ``x``:
    a symmetric scale chosen among 19 trials by x^2-weighted error. Returns (scale, codes + nmax)."""
    biggest = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    zero = np.abs(biggest) < GROUP_MAX_EPS
    biggest = np.where(zero, _F32(1), biggest)
    w = x * x
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        li = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = li.astype(_F32)
        return li, _seqsum(wx * lf), _seqsum(w * lf * lf)

    li, sumlx, suml2 = trial(_F32(-nmax) / biggest)
    L = li + nmax
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            li, sumlx, suml2 = trial(-(_F32(nmax) + _F32(0.1) * _F32(step)) / biggest)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2) & ~zero
            L = np.where(better[:, None], li + nmax, L)
            scale = np.where(better, sumlx / suml2, scale).astype(_F32)
            best = np.where(better, scale * sumlx, best).astype(_F32)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, _F32(0), scale)
    return scale, L


def _rtn_q6_k(x: np.ndarray, f: BlockFormat) -> BlockCodes:
    """``quantize_row_q6_K_ref``: a scale per 16 weights (make_qx_quants), quantized to int8 against
    the super-block's largest, then the codes recomputed from the stored scales."""
    rows, cols = x.shape
    ns = cols // QK_K
    groups = x.reshape(rows * ns * 16, 16)
    scales, L = _make_qx_quants(groups, 32)
    scales = scales.reshape(rows * ns, 16)
    biggest = np.take_along_axis(scales, np.abs(scales).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    zero = np.abs(biggest) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.where(zero, _F32(0), _F32(-128) / np.where(zero, _F32(1), biggest)).astype(_F32)
        d16 = np.where(zero, _F32(0), _F32(1) / iscale).astype(_F16)
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
        sc[zero] = 0
        dg = d16.astype(_F32)[:, None] * sc.astype(_F32)  # (rows*ns, 16)
        xg = groups.reshape(rows * ns, 16, 16)
        requant = np.clip(_nearest_int(xg / dg[..., None]), -32, 31) + 32
    L = np.where((dg != 0)[..., None], requant, L.reshape(rows * ns, 16, 16))
    L[zero] = 0
    return BlockCodes(f, L.reshape(rows, cols).astype(np.uint8), d16.reshape(rows, ns),
                      sub_scales=sc.reshape(rows, ns, 16))


def _rtn_q4_k(x: np.ndarray, f: BlockFormat) -> BlockCodes:
    """``quantize_row_q4_K_ref``: a scale and min per 32 weights (make_qkx2_quants with weights
    ``rms + |x|``), both quantized to 6 bits against the super-block's largest, then the codes
    recomputed from the stored values."""
    rows, cols = x.shape
    ns = cols // QK_K
    groups = x.reshape(rows * ns * 8, 32)
    av_x = np.sqrt(_seqsum(groups * groups) / _F32(32))
    weights = av_x[:, None] + np.abs(groups)
    scales, mins, L = _make_qkx2_quants(groups, weights, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(rows * ns, 8), mins.reshape(rows * ns, 8)
    max_scale = np.maximum(scales.max(axis=-1), _F32(0))
    max_min = np.maximum(mins.max(axis=-1), _F32(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
        ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
        lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
        d16 = (max_scale / _F32(63)).astype(_F16)
        dmin16 = (max_min / _F32(63)).astype(_F16)
        dg = d16.astype(_F32)[:, None] * ls.astype(_F32)
        mg = dmin16.astype(_F32)[:, None] * lm.astype(_F32)
        xg = groups.reshape(rows * ns, 8, 32)
        requant = np.clip(_nearest_int((xg + mg[..., None]) / dg[..., None]), 0, 15)
    L = np.where((dg != 0)[..., None], requant, L.reshape(rows * ns, 8, 32))
    return BlockCodes(f, L.reshape(rows, cols).astype(np.uint8), d16.reshape(rows, ns),
                      dmin=dmin16.reshape(rows, ns), sub_scales=ls.reshape(rows, ns, 8),
                      sub_mins=lm.reshape(rows, ns, 8))


_RTN = {"Q8_0": _rtn_q8_0, "Q4_0": _rtn_symmetric, "Q5_0": _rtn_symmetric, "Q4_1": _rtn_min,
        "Q5_1": _rtn_min, "Q6_K": _rtn_q6_k, "Q4_K": _rtn_q4_k}


def quantize_rtn(weight: Any, fmt: str | int | BlockFormat) -> BlockCodes:
    """Round-to-nearest codes of a float ``(rows, cols)`` weight, as llama.cpp's reference
    quantizer for ``fmt`` chooses them (``quantize_row_q8_0_ref`` etc., computed in float32 without
    fused multiply-adds): ``pack`` of the result equals ``gguf.quants.quantize(weight, qtype)`` for
    the formats gguf.quants can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). The weight is taken as
    float32; non-finite values and widths the format cannot split are ``ValueError``."""
    f = block_format(fmt)
    return _RTN[f.name](_weight_2d(weight, f), f)


# ----------------------------------------------------------------------------------------------
# Importance-weighted codes (llama.cpp's "imatrix" idea, searched over the stored fp16 scale)
# ----------------------------------------------------------------------------------------------

WEIGHTED_FORMATS = ("Q4_0", "Q5_0", "Q8_0")  # symmetric 32-weight blocks with one fp16 scale
_SCALE_STEPS = np.linspace(-1.0, 1.0, 21, dtype=_F32)  # trial scales: max / -(half + step)


def _symmetric_range(f: BlockFormat) -> tuple[int, int, int]:
    """(lowest signed code, highest signed code, offset) of a symmetric 32-weight format."""
    if f.name == "Q8_0":
        return -128, 127, 0
    half = 1 << (f.bits - 1)
    return -half, half - 1, half


def _weighted_error(x: np.ndarray, w: np.ndarray, d16: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, error) of blocks ``x`` (rows, nb, 32) at stored scales ``d16`` (float32 values of
    fp16 scales): codes round ``x / d`` to nearest within ``[lo, hi]``; error ``sum w (x - d q)^2``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(x / d16[..., None]), lo, hi)
    q[np.broadcast_to(d16[..., None] == 0, q.shape)] = 0
    diff = x - d16[..., None] * q
    return q, (w * diff * diff).sum(-1, dtype=np.float64)


def quantize_weighted(weight: Any, fmt: str | int | BlockFormat, importance: Any, *, rows_per_chunk: int = 4096) -> BlockCodes:
    """Codes of a ``(rows, cols)`` weight in a symmetric 32-weight format (Q4_0, Q5_0, Q8_0) that
    minimize, block by block, the importance-weighted squared error ``sum_j imp_j (w_j - d q_j)^2``
    with the scale ``d`` as stored (fp16), rather than the error of each weight alike.

    ``importance``: per column ``(cols,)`` (the mean squared input each column multiplies, as
    llama.cpp's importance matrix holds it) or per weight ``(rows, cols)``; non-negative. Trial
    scales: the reference quantizer's own (so no block is ever worse than round to nearest by this
    measure), ``max / -(half + s)`` for 21 steps ``s`` in [-1, 1], and for each trial the weighted
    least-squares refit of the scale to its codes; every trial is rounded to fp16 before it is
    scored. A row whose importances are all zero falls back to uniform weights."""
    f = block_format(fmt)
    if f.name not in WEIGHTED_FORMATS:
        raise ValueError(f"importance-weighted codes are written for {', '.join(WEIGHTED_FORMATS)}, not {f.name}")
    x = _weight_2d(weight, f)
    rows, cols = x.shape
    imp = np.asarray(importance, dtype=_F32)
    if imp.shape == (cols,):
        imp = np.broadcast_to(imp, (rows, cols))
    if imp.shape != (rows, cols) or not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"importance must be finite, non-negative, of shape ({cols},) or ({rows}, {cols});"
                         f" found shape {np.shape(importance)}")
    reference = quantize_rtn(x, f)
    lo, hi, offset = _symmetric_range(f)
    codes = np.empty((rows, cols), dtype=np.int16)
    scales = np.empty((rows, cols // 32), dtype=_F16)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        b = x[r0:r1].reshape(r1 - r0, -1, 32)
        w = np.array(imp[r0:r1], dtype=_F32)
        flat = w.sum(-1) <= 0
        w[flat] = 1.0
        w = w.reshape(b.shape)
        d_ref = reference.d[r0:r1].astype(_F32)
        best_q, best_err = _weighted_error(b, w, d_ref, lo, hi)
        best_d = d_ref.copy()
        biggest = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        def keep(d, q, err) -> None:
            nonlocal best_err, best_d, best_q
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better, d, best_d)
            best_q = np.where(better[..., None], q, best_q)

        for step in _SCALE_STEPS:
            d0 = (biggest / -(_F32(-lo) + step)).astype(_F16).astype(_F32)
            q0, err0 = _weighted_error(b, w, d0, lo, hi)
            keep(d0, q0, err0)
            wq = w * q0
            den = (wq * q0).sum(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                refit = np.where(den > 0, (wq * b).sum(-1) / den, 0).astype(_F16).astype(_F32)
            keep(refit, *_weighted_error(b, w, refit, lo, hi))
        codes[r0:r1] = best_q.reshape(r1 - r0, cols).astype(np.int16) + offset
        scales[r0:r1] = best_d.astype(_F16)
    dtype = np.int8 if f.code_min < 0 else np.uint8
    return BlockCodes(f, codes.astype(dtype), scales)


# ----------------------------------------------------------------------------------------------
# Codes a quantizer chose: per-group scales and zero points to stored parameters
# ----------------------------------------------------------------------------------------------


def _group_params(codes: np.ndarray, scales: Any, zero_points: Any, f: BlockFormat,
                  bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points as float64 ``(rows, cols // 32)``: one pair per 32-weight block."""
    rows, cols = codes.shape
    s = np.asarray(scales, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != rows or s.shape[1] == 0 or cols % s.shape[1]:
        raise ValueError(f"scales must be (rows, groups) with rows {rows} and the groups dividing {cols} columns,"
                         f" found shape {s.shape}")
    group = cols // s.shape[1]
    if group % f.block_size:
        raise ValueError(f"{f.name} blocks hold {f.block_size} weights; a group of {group} is not a whole"
                         " number of blocks (use a group size that is a multiple of 32)")
    if zero_points is None:
        z = np.full(s.shape, float(1 << ((bits or f.bits) - 1)))
    else:
        z = np.asarray(zero_points, dtype=np.float64)
        if z.shape != s.shape:
            raise ValueError(f"zero_points must have the shape of scales {s.shape}, found {z.shape}")
    repeat = group // f.block_size
    return np.repeat(s, repeat, axis=1), np.repeat(z, repeat, axis=1)


def _block_where(flat_index: int, nb: int, block: int) -> str:
    row, blk = divmod(flat_index, nb)
    return f"row {row}, block {blk} (columns {blk * block}-{blk * block + block - 1})"


def from_group_params(codes: Any, scales: Any, zero_points: Any, fmt: str | int | BlockFormat, *,
                      bits: int | None = None) -> BlockCodes:
    """:class:`BlockCodes` for codes a quantizer chose, whose weights are ``(q - zero) * scale``.

    ``codes``: integers ``(rows, cols)``; ``scales`` and ``zero_points``: one per group
    ``(rows, cols // group)``, the group a multiple of 32 (GPTQ's and AWQ's layout); zero points None
    means symmetric, ``2^(bits-1)`` with ``bits`` defaulting to the format's. Asymmetric codes map to
    Q4_1/Q5_1 (``d = scale``, ``m = -zero * scale``); symmetric ones to Q4_0/Q5_0/Q8_0 (stored code
    ``q - zero + offset``, e.g. zero 8 for Q4_0, 128 for 8-bit codes in Q8_0).

    The stored fp16 parameters must give back exactly the float32 weights the quantizer meant:
    ``ValueError`` names the first block where llama.cpp's ``d * q + m`` (fp16 widened to float32)
    differs from ``(q - zero) * scale``, or whose codes the format cannot hold. Pass scales through
    :func:`round_params_fp16` (and re-derive the codes with them) to avoid it. The K-quants have
    two levels of scales, which per-group parameters do not determine: build :class:`BlockCodes`
    directly for those (or use :func:`quantize_rtn`)."""
    f = block_format(fmt)
    if f.super_block:
        raise ValueError(f"{f.name} stores two levels of scales (an fp16 super-block scale times a small integer"
                         " per sub-block), which per-group scales do not determine: build BlockCodes with d and"
                         f" sub_scales directly, or use a 32-block format ({', '.join(_BLOCK_32)})")
    q = np.asarray(codes)
    if q.ndim != 2 or not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array, found {q.dtype} of shape {q.shape}")
    rows, cols = q.shape
    check_cols(f, cols, name="the codes")
    s, z = _group_params(q, scales, zero_points, f, bits)
    nb = cols // f.block_size
    qb = q.reshape(rows, nb, f.block_size).astype(np.int64)
    if not (np.isfinite(s).all() and np.isfinite(z).all()):
        i = int(np.flatnonzero(~(np.isfinite(s) & np.isfinite(z)).ravel())[0])
        raise ValueError(f"{_block_where(i, nb, f.block_size)}: scale {s.ravel()[i]} / zero point {z.ravel()[i]}"
                         " is not finite")
    with np.errstate(over="ignore"):  # overflow is reported below, naming the block
        d16 = s.astype(_F16)
        m16 = (-z * s).astype(_F16) if f.has_min else None
    kw: dict[str, Any] = {}
    if f.has_min:
        stored = qb
        kw["m"] = m16
        if not (np.isfinite(d16.astype(_F32)).all() and np.isfinite(kw["m"].astype(_F32)).all()):
            i = int(np.flatnonzero(~(np.isfinite(d16) & np.isfinite(kw["m"])).ravel())[0])
            raise ValueError(f"{_block_where(i, nb, f.block_size)}: scale {s.ravel()[i]} or -zero*scale overflows fp16")
    else:
        if not np.array_equal(z, np.round(z)):
            i = int(np.flatnonzero((z != np.round(z)).ravel())[0])
            raise ValueError(f"{_block_where(i, nb, f.block_size)}: {f.name} has no offset, so the zero point must"
                             f" be an integer, found {z.ravel()[i]} (use {'Q4_1' if f.bits == 4 else 'Q5_1'} for"
                             " asymmetric codes)")
        stored = qb - z.astype(np.int64)[..., None] + f.offset
        if not np.isfinite(d16.astype(_F32)).all():
            i = int(np.flatnonzero(~np.isfinite(d16).ravel())[0])
            raise ValueError(f"{_block_where(i, nb, f.block_size)}: scale {s.ravel()[i]} overflows fp16")
    outside = (stored < f.code_min) | (stored > f.code_max)
    if outside.any():
        i = int(np.flatnonzero(outside.any(axis=-1).ravel())[0])
        j = int(np.flatnonzero(outside.reshape(-1, f.block_size)[i])[0])
        raise ValueError(f"{_block_where(i, nb, f.block_size)}: code {qb.reshape(-1, f.block_size)[i, j]} with zero"
                         f" point {z.ravel()[i]} is stored as {stored.reshape(-1, f.block_size)[i, j]}, outside"
                         f" {f.name}'s codes [{f.code_min}, {f.code_max}]")
    result = BlockCodes(f, stored.reshape(rows, cols), d16, **kw)
    meant = (qb.astype(_F32) - z.astype(_F32)[..., None]) * s.astype(_F32)[..., None]
    got = dequantize(result).reshape(rows, nb, f.block_size)
    wrong = (got != meant).any(axis=-1)
    if wrong.any():
        i = int(np.flatnonzero(wrong.ravel())[0])
        j = int(np.flatnonzero((got != meant).reshape(-1, f.block_size)[i])[0])
        stored_params = f"d = {float(d16.ravel()[i])!r}" + (f", m = {float(kw['m'].ravel()[i])!r}" if f.has_min else "")
        raise ValueError(f"{_block_where(i, nb, f.block_size)}: scale {float(s.ravel()[i])!r} with zero point"
                         f" {float(z.ravel()[i])!r}"
                         f" does not survive fp16 storage ({stored_params}): a weight meant as"
                         f" {float(meant.reshape(-1, f.block_size)[i, j])!r} would be"
                         f" {float(got.reshape(-1, f.block_size)[i, j])!r} in llama.cpp; round the scales with"
                         " round_params_fp16 and re-derive the codes")
    return result


def _round_to_bits(v: np.ndarray, p: int) -> np.ndarray:
    """``v`` (float64) rounded to ``p`` significant bits, half to even."""
    mant, exp = np.frexp(v)
    return np.ldexp(np.round(mant * float(1 << p)), exp - p)


def _is_f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        h = v.astype(_F16).astype(np.float64)
    return np.isfinite(h) & (h == v)


def round_params_fp16(scales: Any, zero_points: Any = None, fmt: str | int | BlockFormat = "Q4_1") -> np.ndarray:
    """Scales near ``scales`` (float32, same shape) that :func:`from_group_params` accepts with
    these zero points in ``fmt``: a quantizer rounds its scales with this, then derives its codes.

    Symmetric formats (or no zero points) store ``d = scale`` in fp16: the nearest fp16 value.
    Q4_1/Q5_1 also store ``m = -zero * scale`` in fp16, and llama.cpp's ``d * q + m`` equals
    ``(q - zero) * scale`` in float32 only when both are exact: the scale is rounded to the most
    significant bits (at most fp16's 11) that keep ``zero * scale`` an fp16 value too, so a zero
    point with a long odd part costs precision (zero 15 leaves 7 bits, zero 8 all 11). Zero points
    must then be integers. ``ValueError`` when a scale is beyond fp16's range."""
    f = block_format(fmt)
    s = np.asarray(scales, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scales must be finite")
    if zero_points is None or not f.has_min:
        with np.errstate(over="ignore"):
            best = s.astype(_F16).astype(np.float64)
        ok = np.isfinite(best)
    else:
        z = np.broadcast_to(np.asarray(zero_points, dtype=np.float64), s.shape)
        if not np.array_equal(z, np.round(z)):
            raise ValueError("zero points must be integers for their products with the scales to be exact in fp16")
        best = np.zeros_like(s)
        ok = np.zeros(s.shape, dtype=bool)
        for p in range(11, 0, -1):  # most significant bits first: the nearest scale that works
            cand = _round_to_bits(s, p)
            works = ~ok & _is_f16(cand) & _is_f16(-z * cand)
            best = np.where(works, cand, best)
            ok |= works
        ok |= s == 0
    if not ok.all():
        i = int(np.flatnonzero(~ok.ravel())[0])
        raise ValueError(f"scale {float(s.ravel()[i])!r} (group {i} in row-major order) cannot be stored in fp16"
                         " (its range is about 6e-8 to 65504)")
    return best.astype(_F32)
