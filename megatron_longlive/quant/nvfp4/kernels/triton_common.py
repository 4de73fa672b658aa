"""Triton device functions shared by the NVFP4 kernels: the exact fp32 operations of reference.py.

Division is `tl.math.div_rn` (IEEE round-to-nearest; plain `/` may compile to an approximate divide on
GPU). Rounding to an integer, ties to even, is (z + 2**23) - 2**23 for 0 <= z < 2**22, and powers of two
are built from exponent bits, so every step is exact or a single correctly rounded fp32 operation.
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
def e2m1_encode(y, r, STOCHASTIC: tl.constexpr):
    """fp32 y (already scaled) -> int32 codes 0..15; r: int32 random in [0, 2**24) when STOCHASTIC."""
    a = tl.minimum(tl.abs(y), 6.0)
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    base = tl.where(a < 2.0, 0, tl.where(a < 4.0, 2, 4))
    z = a * inv_step                                    # exact
    if STOCHASTIC:
        fl = tl.floor(z)
        u = r.to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        k = fl + tl.where(u < z - fl, 1.0, 0.0)
    else:
        k = rne_int(z)
    sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
    return (k.to(tl.int32) + base) | (sign << 3)


@triton.jit
def e2m1_decode(c):
    """int32 codes 0..15 -> fp32 values (code 8 is -0.0)."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0)))
    # set the sign bit directly (a negation may lower to 0 - x, which turns -0.0 into +0.0)
    return (mag.to(tl.int32, bitcast=True) | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _butterfly(x, N: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """One stage on [N, 16] viewed as [N, G, 2, W]: (a, b) -> (a + b, a - b) for pairs at distance W."""
    a, b = tl.split(tl.permute(tl.reshape(x, (N, G, 2, W)), (0, 1, 3, 2)))      # [N, G, W] each
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (N, 16))


@triton.jit
def fwht16_rows(x, N: tl.constexpr):
    """x [N, 16] -> x @ H16 per row, butterflies at distance 8, 4, 2, 1 (the order of hadamard.fwht16)."""
    x = _butterfly(x, N, 1, 8)
    x = _butterfly(x, N, 2, 4)
    x = _butterfly(x, N, 4, 2)
    return _butterfly(x, N, 8, 1)


@triton.jit
def pack_pairs(codes, R: tl.constexpr, C: tl.constexpr):
    """int32 codes [R, C] -> uint8 [R, C // 2], element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, (R, C // 2, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def unpack_pairs(packed, R: tl.constexpr, C2: tl.constexpr):
    """uint8 [R, C2] -> int32 codes [R, 2 * C2]."""
    p = packed.to(tl.int32)
    return tl.reshape(tl.join(p & 0xF, (p >> 4) & 0xF), (R, 2 * C2))
