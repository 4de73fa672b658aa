"""Triton device functions shared by the NVFP4 kernels: the exact fp32 operations of reference.py.

Division is `tl.math.div_rn` (IEEE round-to-nearest; plain `/` may compile to an approximate divide on
GPU), or, per value, `div_markstein`: a product with the correctly rounded reciprocal and two fused
corrections, which gives the same bits at a fraction of the cost. Rounding to an integer, ties to even,
is (z + 2**23) - 2**23 for 0 <= z < 2**22, and powers of two are built from exponent bits, so every step
is exact or a single correctly rounded fp32 operation.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rne_int(z):
    """Round 0 <= z < 2**22 (fp32) to the nearest integer, ties to even."""
    return (z + 8388608.0) - 8388608.0


@triton.jit
def pow2(e):
    """2.0 ** e for int32 e in [-126, 127], exact."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_round(v):
    """fp32 v in [0, 448] -> (E4M3 value as fp32, E4M3 bits as int32): nearest even, subnormals kept."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)                               # below 2**-6 the quantum stays 2**-9
    val = rne_int(v * pow2(3 - e)) * pow2(e - 3)        # both products exact
    vb = val.to(tl.int32, bitcast=True)
    normal = (((((vb >> 23) & 0xFF) - 120) << 3) | ((vb >> 20) & 7))
    sub = (val * 512.0).to(tl.int32)
    return val, tl.where(val >= 0.015625, normal, sub)


@triton.jit
def e4m3_decode(bits):
    """E4M3 bits (int32 0..0x7e) -> fp32 value, exact."""
    e = (bits >> 3) & 0xF
    m = bits & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def e2m1_decode(c):
    """int32 codes 0..15 -> fp32 values (code 8 is -0.0)."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0)))
    # set the sign bit directly (a negation may lower to 0 - x, which turns -0.0 into +0.0)
    return (mag.to(tl.int32, bitcast=True) | ((c & 8) << 28)).to(tl.float32, bitcast=True)


# ----- fast paths of the bandwidth-bound kernels (same bits, fewer instructions) ---------------------------
@triton.jit
def fma_rn(a, b, c, EMULATE: tl.constexpr):
    """RN(a * b + c) with one rounding. The interpreter has no fused multiply-add (it rounds twice), so
    EMULATE computes it in fp64: a * b is exact there, and the sum is exact wherever `div_markstein` needs it."""
    if EMULATE:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def div_markstein(x, neg_s, r, EMULATE: tl.constexpr):
    """RN(x / s) for s = -neg_s > 0 given r = RN(1 / s) (one correctly rounded divide per block, not per value).

    q0 = RN(x * r) is within 1.5 ulp of x / s; each step q <- RN(q + RN(x - q*s) * r) is Markstein's
    correction: once q is within 1 ulp the remainder is exact and the result is RN(x / s). Two steps make
    it hold from 1.5 ulp. Needs no underflow of the remainder: the caller keeps s >= 2**-69 (see
    quantize_triton) and values whose quotient is that tiny only contribute their sign."""
    q = x * r
    q = fma_rn(fma_rn(q, neg_s, x, EMULATE), r, q, EMULATE)
    return fma_rn(fma_rn(q, neg_s, x, EMULATE), r, q, EMULATE)


@triton.jit
def e2m1_magnitude_rne(y):
    """fp32 y -> E2M1 magnitude code 0..7 of |y| (saturated at 6, nearest even), by exponent arithmetic.

    On [P, 2P) with P = 1, 2, 4 (and on [0, 1) with P = 1) the E2M1 grid spacing is P / 2, the ulp of
    M = 2**22 * P: a + M rounds a to that grid with ties to even, and its bits minus those of M count the
    steps k. The code is k plus the first code of the segment, 2 * log2(P) (P = 2 -> 2.0 = code 4 = 2 + 2)."""
    a = tl.minimum(tl.abs(y), 6.0)
    p = tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000        # exponent bits of P
    m = p + (22 << 23)                                                   # bits of M = 2**22 * P
    k = (a + m.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - m
    return k + ((p >> 22) - 254)


@triton.jit
def e2m1_magnitude_sr(y, r):
    """Stochastic rounding of |y| (saturated at 6) to the E2M1 grid with r int32 in [0, 2**24): code 0..7
    (step 7' of reference.py: round up iff r * 2**-24 < frac(|y| / step))."""
    a = tl.minimum(tl.abs(y), 6.0)
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    base = tl.where(a < 2.0, 0, tl.where(a < 4.0, 2, 4))
    z = a * inv_step                                    # exact, < 4
    fl = tl.floor(z)
    up = r.to(tl.float32) * 5.9604644775390625e-08 < z - fl
    return ((fl + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000) + base + up.to(tl.int32)


@triton.jit
def e2m1_value_x2(m):
    """E2M1 magnitude code 0..7 (int32) -> 2 * value as fp32 (0, 1, 2, 3, 4, 6, 8, 12), exact: a nibble
    table (0xC8643210 as int32) and the 2**23 trick for int -> float."""
    n = (-932957680 >> (m * 4)) & 15
    return (n | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def words_to_f32(w, X_FP32: tl.constexpr):
    """Two consecutive input values packed in one word -> (even, odd) as fp32: bf16 pairs in int32 words
    (even value in the low half), or fp32 pairs in int64 words."""
    if X_FP32:
        lo = (w & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    return lo, hi
