"""Reference integer quantization arithmetic, written to match ONNX ``QuantizeLinear`` /
``DequantizeLinear`` and ONNX Runtime's quantizer, so tests and calibration can reason about what
the runtime will compute.

Conventions (the same as ONNX Runtime's ``compute_scale_zp``):

- the real range always includes 0, so zero is exactly representable (padding, ReLU outputs);
- symmetric signed ranges are restricted (``[-127, 127]`` for 8 bits) so that ``-x`` quantizes to
  ``-q``; symmetric unsigned ranges use the full ``[0, 255]`` with zero point 128;
- ``q = clip(round_half_even(x / scale) + zero_point, qmin, qmax)``; ``x' = (q - zero_point) * scale``.

>>> scale, zp = qparams(-1.0, 3.0, symmetric=False, signed=False)
>>> q = quantize(np.array([0.0, 1.0]), scale, zp, signed=False)
>>> dequantize(q, scale, zp)  # doctest: +SKIP
array([0.       , 0.9960785], dtype=float32)
"""

from __future__ import annotations

import numpy as np


def qrange(*, bits: int = 8, symmetric: bool, signed: bool) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` used for ``bits``-bit values."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must lie in 2..16, found {bits}")
    if signed:
        high = 2 ** (bits - 1) - 1
        return (-high if symmetric else -high - 1), high
    return 0, 2**bits - 1


def _storage_dtype(bits: int, signed: bool) -> np.dtype:
    if bits <= 8:
        return np.dtype(np.int8 if signed else np.uint8)
    return np.dtype(np.int16 if signed else np.uint16)


def qparams(
    x_min: float | np.ndarray,
    x_max: float | np.ndarray,
    *,
    bits: int = 8,
    symmetric: bool,
    signed: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (integer) that map ``[x_min, x_max]`` (widened to include 0)
    onto the ``bits``-bit range. Works elementwise on arrays (per-channel ranges).

    A zero-width range gets scale 1 and zero point 0 (all values are 0), like ONNX Runtime.
    """
    qmin, qmax = qrange(bits=bits, symmetric=symmetric, signed=signed)
    lo = np.minimum(np.asarray(x_min, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(x_max, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"quantization range must be finite, found [{x_min}, {x_max}]")
    if symmetric:
        absmax = np.maximum(-lo, hi)
        lo, hi = -absmax, absmax
    scale = (hi - lo) / (qmax - qmin)
    degenerate = scale.astype(np.float32) < np.finfo(np.float32).tiny
    safe_scale = np.where(degenerate, 1.0, scale)
    if symmetric:
        zero_point = np.full(np.shape(scale), np.round((qmin + qmax) / 2.0))
    else:
        zero_point = np.round(qmin - lo / safe_scale)
    zero_point = np.where(degenerate, 0.0, zero_point)
    zero_point = np.clip(zero_point, qmin, qmax).astype(_storage_dtype(bits, signed))
    return safe_scale.astype(np.float32), zero_point


def quantize(
    x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, *, bits: int = 8, signed: bool
) -> np.ndarray:
    """``clip(round_half_even(x / scale) + zero_point)`` in the full ``bits``-bit range, as ONNX
    ``QuantizeLinear`` computes it (float32 division, then round half to even). The one reference
    quantizer: ``quantize_linear`` (the ONNX op with its axis and types) and the weight folding
    passes call it."""
    qmin, qmax = qrange(bits=bits, symmetric=False, signed=signed)
    x32 = np.asarray(x, dtype=np.float32)
    scaled = np.rint(x32 / np.asarray(scale, dtype=np.float32)).astype(np.float64)  # np.rint: half to even
    q = np.clip(scaled + np.asarray(zero_point, dtype=np.float64), qmin, qmax)
    return q.astype(_storage_dtype(bits, signed))


_ONNX_INT_TYPES = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16)}


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """ONNX ``QuantizeLinear``: ``quantize`` in the zero point's type (uint8 without one); a 1-D
    ``scale`` (and zero point) is per slice along ``axis``."""
    zp_dtype = np.dtype(np.uint8) if zero_point is None else np.asarray(zero_point).dtype
    if zp_dtype not in _ONNX_INT_TYPES:
        raise ValueError(f"zero point type {zp_dtype} is not an 8- or 16-bit integer")
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros((), np.int64) if zero_point is None else np.asarray(zero_point, dtype=np.int64)
    if scale.ndim == 1 and x.ndim > 0:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.ndim == 1 else zp
    return quantize(x, scale, zp, bits=8 * zp_dtype.itemsize, signed=zp_dtype.kind == "i")


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32, as ONNX ``DequantizeLinear`` computes it."""
    centered = np.asarray(q, dtype=np.int32) - np.asarray(zero_point, dtype=np.int32)
    return (centered.astype(np.float32) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def fake_quantize(
    x: np.ndarray, x_min: float, x_max: float, *, bits: int = 8, symmetric: bool, signed: bool
) -> np.ndarray:
    """Quantize then dequantize ``x`` with the qparams of ``[x_min, x_max]`` (float32 result)."""
    scale, zp = qparams(x_min, x_max, bits=bits, symmetric=symmetric, signed=signed)
    return dequantize(quantize(x, scale, zp, bits=bits, signed=signed), scale, zp)


def _channel_view(w: np.ndarray, axis: int) -> tuple[np.ndarray, list[int]]:
    w = np.asarray(w)
    axis = axis % w.ndim
    shape = [1] * w.ndim
    shape[axis] = w.shape[axis]
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), shape


def per_channel_qparams(
    w: np.ndarray, axis: int, *, bits: int = 8, symmetric: bool = True, signed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points of each slice of ``w`` along ``axis``, shaped to broadcast against
    ``w`` (size 1 on every other axis)."""
    flat, shape = _channel_view(w, axis)
    scale, zp = qparams(flat.min(axis=1), flat.max(axis=1), bits=bits, symmetric=symmetric, signed=signed)
    return scale.reshape(shape), zp.reshape(shape)


def per_tensor_qparams(
    w: np.ndarray, *, bits: int = 8, symmetric: bool = True, signed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point covering all of ``w``."""
    w = np.asarray(w)
    return qparams(float(w.min()), float(w.max()), bits=bits, symmetric=symmetric, signed=signed)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, ``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in dB.

    ``inf`` when ``approx`` equals ``reference`` exactly; ``-inf`` for an all-zero reference that is
    not matched. 30 dB means the error's energy is 1/1000 of the signal's.
    """
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(approx, dtype=np.float64)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    signal = float(np.sum(ref * ref))
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))
