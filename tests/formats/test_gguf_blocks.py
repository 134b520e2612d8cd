"""llama.cpp's block formats: shrinkml's packed bytes are what gguf (and so llama.cpp) reads back to
exactly the weights shrinkml computes, its round-to-nearest codes are llama.cpp's reference
quantizers' bytes, and codes a quantizer chose go in only when fp16 storage keeps their values."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from shrinkml.formats import gguf_blocks as gb  # noqa: E402

ALL = list(gb.FORMATS)
GGUF_QUANTIZES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants has quantizers for these only


def bits(a: np.ndarray) -> bytes:
    """The exact bits of a float32 array (so -0.0 differs from 0.0 and NaN payloads count)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).tobytes()


def edge_weight(rows: int = 12, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Random weights with the blocks quantizers get wrong: all zero, one huge value, negative
    only, positive only, constant, tiny (fp16-subnormal scales), signed zeros."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((max(rows, 12), cols)) * 0.05).astype(np.float32)
    w[0] = 0.0  # whole rows (and so whole K super-blocks) of zeros
    w[1, :32] = 0.0
    w[1, 40] = 25.0  # one huge value in a block
    w[2, :] = -np.abs(w[2, :])  # negative only
    w[3, :] = np.abs(w[3, :]) + 0.01  # positive only, no zero in the block
    w[4, 64:128] = 0.3  # constant blocks
    w[5] *= np.float32(1e-4)  # scales below fp16's normal range
    w[6, :64] = np.where(np.arange(64) % 2 == 0, np.float32(0.0), np.float32(-0.0))
    w[7, 256:272] = 0.0  # one all-zero Q6_K sub-block
    w[8, 5] = -30.0
    return w[:rows]


def golden_weight(rows: int = 24, cols: int = 512) -> np.ndarray:
    """Weights made by integer arithmetic and exact float32 operations, so the same bits on every
    machine and numpy (the golden digests below were computed from them)."""
    i = np.arange(rows * cols, dtype=np.int64)
    u = ((i * 2654435761 + 12345) % 1000003).astype(np.float32) / np.float32(1000003) - np.float32(0.5)
    w = (u * u * u * np.float32(0.25) + u * np.float32(0.03125)).reshape(rows, cols)
    w[1] = 0
    w[2, :256] = -np.abs(w[2, :256])
    w[3, 17] = 40.0
    w[4, :16] = 0
    w[5, 300:340] = np.float32(1e-20)
    return w


# sha256 of llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref output for golden_weight(),
# computed by compiling ggml-quants.c's reference functions (llama.cpp master, 2025) with
# gcc -O2 -ffp-contract=off, i.e. float32 arithmetic without fused multiply-adds.
LLAMA_CPP_REF_SHA256 = {
    "Q4_K": "6cb1ec1d2b1744fe1fb3e8c9941caff9455aa5968c878afd0876afd3af055699",
    "Q6_K": "fe14846e07f63d6796b09ae35ee51edb1f59cc1d7cc4f4f95d942ec2c1e1fcc2",
}


def random_codes(fmt: str, rows: int = 6, cols: int = 512, seed: int = 0) -> gb.BlockCodes:
    """Codes over each format's whole range with random stored parameters (not from a quantizer),
    so every bit position of the layout is exercised."""
    f = gb.block_format(fmt)
    rng = np.random.default_rng(seed)
    nb = cols // f.block_size
    codes = rng.integers(f.code_min, f.code_max + 1, (rows, cols))
    codes[0, : f.block_size] = f.code_max
    codes[1, : f.block_size] = f.code_min
    d = (rng.standard_normal((rows, nb)) * 0.01).astype(np.float16)
    d[0, 0] = 0.0
    kw = {}
    if f.has_min and not f.super_block:
        kw["m"] = (rng.standard_normal((rows, nb)) * 0.1).astype(np.float16)
    if f.name == "Q6_K":
        kw["sub_scales"] = rng.integers(-128, 128, (rows, nb, 16))
    if f.name == "Q4_K":
        d = np.abs(d)
        kw["dmin"] = np.abs(rng.standard_normal((rows, nb)) * 0.01).astype(np.float16)
        kw["sub_scales"] = rng.integers(0, 64, (rows, nb, 8))
        kw["sub_mins"] = rng.integers(0, 64, (rows, nb, 8))
    return gb.BlockCodes(f, codes, d, **kw)


def test_the_format_table_is_gguf_s():
    for name, f in gb.FORMATS.items():
        qtype = gguf.GGMLQuantizationType[name]
        assert f.type_id == qtype and f.qtype is qtype
        assert (f.block_size, f.type_size) == gguf.GGML_QUANT_SIZES[qtype]
        assert gb.block_format(qtype) is f and gb.block_format(name.lower()) is f
    assert gb.bytes_per_weight("Q8_0") == 34 / 32 and gb.block_format("Q4_0").bits_per_weight == 4.5
    with pytest.raises(ValueError, match="unsupported GGUF block format 'IQ2_XXS'"):
        gb.block_format(gguf.GGMLQuantizationType.IQ2_XXS)


@pytest.mark.parametrize("fmt", ALL)
def test_gguf_dequantizes_packed_rtn_codes_to_exactly_our_weights(fmt):
    f = gb.block_format(fmt)
    for w in (golden_weight(), edge_weight()):
        c = gb.quantize_rtn(w, fmt)
        packed = gb.pack(c)
        assert packed.dtype == np.uint8
        assert packed.shape == gguf.quants.quant_shape_to_byte_shape(w.shape, f.qtype) == gb.packed_shape(fmt, *w.shape)
        assert packed.nbytes == c.nbytes
        ours = gb.dequantize(c)
        assert ours.dtype == np.float32 and ours.shape == w.shape
        assert bits(gguf.quants.dequantize(packed, f.qtype)) == bits(ours)
        assert gb.unpack(packed, fmt).same_as(c)
        # all-zero rows come back as zeros, the one huge value as itself (near enough), the rest close
        assert not ours[~w.any(axis=1)].any()
    assert abs(ours[1, 40] - 25.0) < 25.0 / 2 ** (f.bits - 1) / 2 * 1.01
    error = np.abs(ours - w)[9:].max()
    assert error < 0.06 if f.bits <= 4 else error < 0.02


@pytest.mark.parametrize("fmt", ALL)
def test_any_codes_and_parameters_pack_to_what_gguf_reads(fmt):
    f = gb.block_format(fmt)
    c = random_codes(fmt)
    packed = gb.pack(c)
    with np.errstate(over="ignore"):
        assert bits(gguf.quants.dequantize(packed, f.qtype)) == bits(gb.dequantize(c))
    back = gb.unpack(packed, fmt)
    assert back.same_as(c) and np.array_equal(back.codes, c.codes)


@pytest.mark.parametrize("fmt", GGUF_QUANTIZES)
def test_rtn_bytes_equal_gguf_quants(fmt):
    qtype = gb.block_format(fmt).qtype
    for w in (edge_weight(), golden_weight(), edge_weight(seed=3) * 100):
        assert np.array_equal(gb.pack(gb.quantize_rtn(w, fmt)), gguf.quants.quantize(w, qtype))


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_k_quant_rtn_bytes_equal_llama_cpp_reference(fmt):
    packed = gb.pack(gb.quantize_rtn(golden_weight(), fmt))
    assert hashlib.sha256(packed.tobytes()).hexdigest() == LLAMA_CPP_REF_SHA256[fmt]


def test_rtn_takes_float16_and_float64_as_float32_and_refuses_non_finite():
    w = edge_weight(rows=2, cols=64)
    ref = gb.pack(gb.quantize_rtn(w, "Q8_0"))
    assert np.array_equal(gb.pack(gb.quantize_rtn(w.astype(np.float64), "Q8_0")), ref)
    w[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite value .* row 1, column 3"):
        gb.quantize_rtn(w, "Q4_0")
    with pytest.raises(ValueError, match="2-D"):
        gb.quantize_rtn(np.zeros(64, np.float32), "Q4_0")


def test_widths_that_do_not_split_into_blocks_are_refused_with_the_reason():
    assert gb.fits("Q4_0", 576) and not gb.fits("Q4_K", 576) and not gb.fits("Q6_K", 576) and gb.fits("Q6_K", 1536)
    assert not gb.fits("Q8_0", 48) and not gb.fits("Q8_0", 0)
    with pytest.raises(ValueError, match=r"rows of 576 weights.*Q4_K.*256.*Q5_0"):
        gb.quantize_rtn(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match=r"Q6_K.*Q8_0"):
        gb.check_cols("Q6_K", 576)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        gb.quantize_rtn(np.zeros((2, 40), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="multiple of 34 bytes"):
        gb.unpack(np.zeros((2, 35), np.uint8), "Q8_0")


def test_block_codes_validate_what_they_hold():
    f = gb.block_format("Q4_1")
    codes, d, m = np.zeros((2, 64), np.uint8), np.zeros((2, 2), np.float16), np.zeros((2, 2), np.float16)
    c = gb.BlockCodes("Q4_1", codes, d, m=m)
    assert c.fmt is f and c.shape == (2, 64) and not c.codes.flags.writeable
    with pytest.raises(ValueError, match="needs m"):
        gb.BlockCodes(f, codes, d)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        gb.BlockCodes(f, codes + 16, d, m=m)
    with pytest.raises(ValueError, match="must hold fp16 values"):
        gb.BlockCodes(f, codes, np.full((2, 2), 0.1, np.float32), m=m)
    with pytest.raises(ValueError, match=r"d must have shape \(2, 2\)"):
        gb.BlockCodes(f, codes, np.zeros((2, 3), np.float16), m=m)
    with pytest.raises(ValueError, match="Q4_0 has no m"):
        gb.BlockCodes("Q4_0", codes, d, m=m)
    # fp16-exact float32 parameters are taken as they are
    assert gb.BlockCodes(f, codes, np.full((2, 2), 0.5, np.float32), m=m).d.dtype == np.float16


# ---------------------------------------------------------------------------------------------
# Codes a quantizer chose
# ---------------------------------------------------------------------------------------------


def asym_group_quantize(w: np.ndarray, group: int = 32, bits: int = 4, fmt: str = "Q4_1"):
    """What an asymmetric group quantizer (GPTQ without error feedback) does, scales made storable."""
    rows, cols = w.shape
    g = w.reshape(rows, -1, group)
    top = 2**bits - 1
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    scale = (hi - lo) / top
    zero = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, top)
    scale = gb.round_params_fp16(scale, zero, fmt)
    q = np.clip(np.round(g / np.where(scale == 0, 1, scale)[..., None] + zero[..., None]), 0, top)
    return q.astype(np.uint8).reshape(rows, cols), scale, zero


@pytest.mark.parametrize("fmt,bits", [("Q4_1", 4), ("Q5_1", 5)])
def test_asymmetric_group_codes_keep_their_values_in_q4_1_and_q5_1(fmt, bits):
    w = edge_weight(rows=8, cols=256)
    for group in (32, 128):
        q, scale, zero = asym_group_quantize(w, group, bits, fmt)
        c = gb.from_group_params(q, scale, zero, fmt)
        meant = (q.reshape(8, -1, group).astype(np.float32) - zero[..., None].astype(np.float32)) * scale[..., None]
        assert np.array_equal(gb.dequantize(c), meant.reshape(8, 256))
        f = gb.block_format(fmt)
        assert bits_equal_after_gguf(c, f)
        assert np.array_equal(c.codes, q)  # Q4_1 stores the codes as they are, d = scale, m = -zero * scale
        assert np.array_equal(c.d.astype(np.float32), np.repeat(scale, group // 32, axis=1))


def bits_equal_after_gguf(c: gb.BlockCodes, f: gb.BlockFormat) -> bool:
    return bits(gguf.quants.dequantize(gb.pack(c), f.qtype)) == bits(gb.dequantize(c))


@pytest.mark.parametrize("fmt,bits,zero", [("Q4_0", 4, 8), ("Q5_0", 5, 16), ("Q8_0", 8, 128), ("Q8_0", 4, 8)])
def test_symmetric_group_codes_map_to_the_centred_formats(fmt, bits, zero):
    w = edge_weight(rows=8, cols=256)
    g = w.reshape(8, -1, 32)
    half = 2 ** (bits - 1)
    scale = gb.round_params_fp16(np.abs(g).max(-1) / (half - 1), None, fmt)
    q = (np.clip(np.round(g / np.where(scale == 0, 1, scale)[..., None]), -half, half - 1) + zero).astype(np.uint8)
    c = gb.from_group_params(q.reshape(8, 256), scale, None, fmt, bits=bits)
    meant = (q.astype(np.float32) - np.float32(zero)) * scale[..., None]
    assert np.array_equal(gb.dequantize(c), meant.reshape(8, 256))
    assert bits_equal_after_gguf(c, gb.block_format(fmt))


def test_scales_fp16_cannot_hold_are_refused_naming_the_block():
    w = edge_weight(rows=4, cols=128)
    g = w.reshape(4, -1, 32)
    scale = (np.abs(g).max(-1) / 7).astype(np.float32)
    scale[2, 1] = np.float32(0.0123456)  # not an fp16 value; all others are
    scale = np.where(np.arange(4)[:, None] == 2, scale, scale.astype(np.float16).astype(np.float32))
    scale[2, 0] = np.float16(scale[2, 0])
    q = (np.clip(np.round(g / np.where(scale == 0, 1, scale)[..., None]), -8, 7) + 8).astype(np.uint8).reshape(4, 128)
    with pytest.raises(ValueError, match=r"row 2, block 1 \(columns 32-63\).*does not survive fp16.*round_params_fp16"):
        gb.from_group_params(q, scale, None, "Q4_0")
    # the same codes with round_params_fp16's scales go in
    gb.from_group_params(q, gb.round_params_fp16(scale, None, "Q4_0"), None, "Q4_0")


def test_asymmetric_params_whose_min_is_not_exact_are_refused():
    q = np.tile(np.arange(16, dtype=np.uint8), (1, 2))  # one block using every code
    zero = np.array([[15.0]])
    scale = np.array([[np.float16(0.0100021)]], dtype=np.float32)  # fp16, but 15 * scale is not
    assert not np.float16(15 * scale[0, 0]) == 15 * scale[0, 0]
    with pytest.raises(ValueError, match=r"row 0, block 0.*zero point 15\.0 does not survive fp16"):
        gb.from_group_params(q, scale, zero, "Q4_1")
    fixed = gb.round_params_fp16(scale, zero, "Q4_1")
    assert abs(fixed[0, 0] / scale[0, 0] - 1) < 2**-7
    c = gb.from_group_params(q, fixed, zero, "Q4_1")
    assert np.array_equal(gb.dequantize(c)[0], (np.arange(32) % 16 - 15).astype(np.float32) * fixed[0, 0])


def test_round_params_fp16_keeps_as_much_precision_as_fp16_allows():
    rng = np.random.default_rng(1)
    scale = np.abs(rng.standard_normal((64, 8))).astype(np.float32) * 0.01
    symmetric = gb.round_params_fp16(scale, None, "Q4_0")
    assert np.array_equal(symmetric, scale.astype(np.float16).astype(np.float32))
    zero8 = gb.round_params_fp16(scale, np.full(scale.shape, 8.0), "Q4_1")  # 8 = 2^3: no bits lost
    assert np.array_equal(zero8, symmetric)
    zeros = rng.integers(0, 16, scale.shape).astype(np.float64)
    rounded = gb.round_params_fp16(scale, zeros, "Q4_1")
    assert (np.abs(rounded / scale - 1) < 2**-7).all()
    assert np.array_equal(np.float16(-zeros * rounded).astype(np.float64), -zeros * rounded.astype(np.float64))
    with pytest.raises(ValueError, match="cannot be stored in fp16"):
        gb.round_params_fp16(np.array([[1e6]]), None, "Q8_0")
    with pytest.raises(ValueError, match="integers"):
        gb.round_params_fp16(scale, zeros + 0.5, "Q4_1")


def test_from_group_params_refuses_what_the_format_cannot_hold():
    q = np.full((1, 32), 3, dtype=np.uint8)
    one = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match=r"code 3 with zero point 12\.0 is stored as -1, outside Q4_0's codes \[0, 15\]"):
        gb.from_group_params(q, one, np.full((1, 1), 12.0), "Q4_0")
    with pytest.raises(ValueError, match="zero point must be an integer"):
        gb.from_group_params(q, one, np.full((1, 1), 7.5), "Q4_0")
    with pytest.raises(ValueError, match="outside Q4_1's codes"):
        gb.from_group_params(q * 6, one, np.zeros((1, 1)), "Q4_1")
    with pytest.raises(ValueError, match="two levels of scales"):
        gb.from_group_params(np.zeros((1, 256), np.uint8), np.ones((1, 8)), None, "Q4_K")
    with pytest.raises(ValueError, match="group of 16 is not a whole number of blocks"):
        gb.from_group_params(np.zeros((1, 64), np.uint8), np.ones((1, 4)), None, "Q4_0")
    with pytest.raises(ValueError, match="overflows fp16"):
        gb.from_group_params(q, np.full((1, 1), 1e6), None, "Q4_0")


# ---------------------------------------------------------------------------------------------
# Importance-weighted codes
# ---------------------------------------------------------------------------------------------


def _weighted_block_errors(w: np.ndarray, imp: np.ndarray, c: gb.BlockCodes) -> np.ndarray:
    rows, cols = w.shape
    err = imp * np.square(w.astype(np.float64) - gb.dequantize(c).astype(np.float64))
    return err.reshape(rows, cols // 32, 32).sum(-1)


@pytest.mark.parametrize("fmt", gb.WEIGHTED_FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_codes_are_never_worse_than_round_to_nearest_in_any_block(fmt, seed):
    rng = np.random.default_rng(seed)
    w = edge_weight(rows=16, cols=256, seed=seed)
    imp = rng.gamma(0.3, 1.0, size=256).astype(np.float32)  # a few columns matter far more than the rest
    imp[:32] = 0.0  # a whole block no input ever reaches
    weighted, rtn = gb.quantize_weighted(w, fmt, imp), gb.quantize_rtn(w, fmt)
    ew, er = _weighted_block_errors(w, imp, weighted), _weighted_block_errors(w, imp, rtn)
    assert np.all(ew <= er * (1 + 1e-6) + 1e-30), f"{int((ew > er * (1 + 1e-6)).sum())} blocks got worse"
    # and on ordinary weights the search finds better scales where importances differ
    plain = (rng.standard_normal((16, 256)) * 0.02).astype(np.float32)
    gain = (_weighted_block_errors(plain, imp, gb.quantize_weighted(plain, fmt, imp)).sum()
            / _weighted_block_errors(plain, imp, gb.quantize_rtn(plain, fmt)).sum())
    assert gain < 0.95
    # what it chose packs, and gguf reads back exactly the values it scored
    got = gguf.quants.dequantize(gb.pack(weighted), weighted.fmt.qtype)
    assert bits(got) == bits(gb.dequantize(weighted))


def test_weighted_codes_take_per_weight_importance_and_refuse_bad_importance():
    w = edge_weight(rows=4, cols=64)
    per_weight = np.ones_like(w)
    per_weight[:, 3] = 100.0
    c = gb.quantize_weighted(w, "Q4_0", per_weight)
    assert c.fmt.name == "Q4_0" and c.shape == w.shape
    for bad in (np.ones(63), -np.ones(64), np.full(64, np.nan)):
        with pytest.raises(ValueError, match="importance"):
            gb.quantize_weighted(w, "Q4_0", bad)
    with pytest.raises(ValueError, match="Q4_1"):
        gb.quantize_weighted(w, "Q4_1", np.ones(64))
