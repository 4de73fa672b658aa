"""Triton NVFP4 quantize kernels: 1x16 (optional RHT, optional stochastic rounding) and 16x16 tiles.

Each op produces the bits of reference.py (see its docstring) with fewer instructions per value, so that
the kernels run near copy bandwidth (bench/bench_nvfp4.py):

- the input is read as words holding two consecutive values (bf16 pairs in int32, fp32 pairs in int64):
  the even value gives the low nibble of a code byte, the odd one the high nibble, so packing needs no
  shuffle and word index == code byte index; a 16-block is 8 words.
- 1x16 kernels work on the flat tensor (K % 16 == 0, so no block crosses a row): NB blocks per program.
- x / scale (step 6) is one correctly rounded reciprocal per block and a Markstein-corrected multiply per
  value (`div_markstein`, bitwise RN(x / scale)); the E2M1 code comes from exponent arithmetic
  (`e2m1_magnitude_rne`). Tensors with a tiny amax (s_t < 2**-60) take the plain div.rn path.
- the per-tensor amax (`amax_kernel`) reduces a large tile per program to one `atomic_max` on the fp32
  bits (non-negative floats order like their int32 bits); without RHT it is integer arithmetic on the
  bf16 bits. The quantize pass reads it from device memory (no host sync).

Random bits for stochastic rounding are either given (int32 in [0, 2**24), shape of x) or drawn in-kernel
from Philox: flat value e takes output e % 4 of `randint4x(seed, e // 4)`, >> 8 (one Philox call per four
values; `philox_bits_kernel` writes exactly those bits).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import div_markstein, e2m1_magnitude_rne, e2m1_magnitude_sr, e4m3_round, words_to_f32

SR_NONE, SR_BITS, SR_PHILOX = 0, 1, 2
FAST_DIV_MIN_TS = 2.0 ** -60
"""Below this tensor scale the remainders of `div_markstein` could underflow: plain division instead."""


@triton.jit
def _butterfly8(x, N: tl.constexpr, G: tl.constexpr, W: tl.constexpr):
    """One stage on words [N, 8] viewed as [N, G, 2, W]: (a, b) -> (a + b, a - b) for words W apart."""
    a, b = tl.split(tl.permute(tl.reshape(x, (N, G, 2, W)), (0, 1, 3, 2)))      # [N, G, W] each
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (N, 8))


@triton.jit
def _rht_pairs(lo, hi, signs_ptr, N: tl.constexpr):
    """RHT of 16-blocks held as even values `lo` [N, 8] and odd values `hi` [N, 8]: the butterfly of
    hadamard.fwht16 (value distance 8, 4, 2 = word distance 4, 2, 1, then 1 = lo against hi), same ops."""
    w = tl.arange(0, 8)
    lo = lo * tl.load(signs_ptr + 2 * w)[None, :]
    hi = hi * tl.load(signs_ptr + 2 * w + 1)[None, :]
    lo, hi = _butterfly8(lo, N, 1, 4), _butterfly8(hi, N, 1, 4)
    lo, hi = _butterfly8(lo, N, 2, 2), _butterfly8(hi, N, 2, 2)
    lo, hi = _butterfly8(lo, N, 4, 1), _butterfly8(hi, N, 4, 1)
    return (lo + hi) * 0.25, (lo - hi) * 0.25


@triton.jit
def amax_kernel(xw_ptr, signs_ptr, amax_ptr, NW, X_FP32: tl.constexpr, USE_RHT: tl.constexpr, NB: tl.constexpr):
    """amax_bits = max(amax_bits, fp32 bits of max |RHT?(x)|) over NB 16-blocks (NB * 8 words) of flat x.
    amax_ptr: int32, zero before the first program."""
    offs = tl.program_id(0) * (NB * 8) + tl.arange(0, NB)[:, None] * 8 + tl.arange(0, 8)[None, :]
    mask = offs < NW
    w = tl.load(xw_ptr + offs, mask=mask, other=0)
    if USE_RHT:
        lo, hi = words_to_f32(w, X_FP32)
        lo, hi = _rht_pairs(lo, hi, signs_ptr, NB)
        m = tl.max(tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=1), axis=0).to(tl.int32, bitcast=True)
    elif X_FP32:
        m = tl.max(tl.max(tl.maximum(w & 0x7FFFFFFF, (w >> 32) & 0x7FFFFFFF), axis=1), axis=0).to(tl.int32)
    else:
        m = tl.max(tl.max(tl.maximum(w & 0x7FFF, (w >> 16) & 0x7FFF), axis=1), axis=0) << 16
    tl.atomic_max(amax_ptr, m)


@triton.jit
def _tensor_scale(amax_ptr):
    return tl.math.div_rn(tl.load(amax_ptr), 2688.0)


@triton.jit
def _scales(bmax, s_t):
    """Block amax -> (E4M3 value fp32, E4M3 bits) given the tensor decode scale s_t (step 4)."""
    denom = s_t * 6.0
    sb_f = tl.minimum(tl.math.div_rn(bmax, tl.where(s_t > 0, denom, 1.0)), 448.0)
    sb_f = tl.where(s_t > 0, sb_f, 0.0)
    return e4m3_round(sb_f)


@triton.jit
def _block_factors(sb, s_t):
    """Per block (steps 5-6): (-scale, with -1 for all-zero blocks; RN(1 / scale) or 0; sign mask 0x88 or 0)."""
    scale = sb * s_t
    ok = scale > 0
    s = tl.where(ok, scale, 1.0)
    return -s, tl.where(ok, tl.math.div_rn(1.0, s), 0.0), tl.where(ok, 0x88, 0)


@triton.jit
def _magnitude(v, neg_s, r, smask, s_t, rbits, SR: tl.constexpr, EMULATE_FMA: tl.constexpr):
    """Steps 6-7 for values v with per-value (broadcast) factors of `_block_factors`: int32 |code| 0..7."""
    if s_t >= 8.673617379884035e-19:                   # FAST_DIV_MIN_TS: then s >= 2**-69
        y = div_markstein(v, neg_s, r, EMULATE_FMA)    # r == 0 in all-zero blocks: y = +-0
    else:
        y = tl.where(smask != 0, tl.math.div_rn(v, -neg_s), 0.0)
    if SR != 0:
        return e2m1_magnitude_sr(y, rbits)
    else:
        return e2m1_magnitude_rne(y)


@triton.jit
def _code_bytes(lo, hi, neg_s, r, smask, s_t, r_lo, r_hi, SR: tl.constexpr, EMULATE_FMA: tl.constexpr):
    """Value pairs -> code bytes (even value in the low nibble); the sign bits are those of the values
    (signbit(x / scale) == signbit(x)), cleared in all-zero blocks (y = +0 there)."""
    c = (_magnitude(lo, neg_s, r, smask, s_t, r_lo, SR, EMULATE_FMA)
         | (_magnitude(hi, neg_s, r, smask, s_t, r_hi, SR, EMULATE_FMA) << 4))
    sign = ((lo.to(tl.int32, bitcast=True) >> 28) & 0x8) | ((hi.to(tl.int32, bitcast=True) >> 24) & 0x80)
    return (c | (sign & smask)).to(tl.uint8)


@triton.jit
def quantize_1x16_kernel(xw_ptr, signs_ptr, randw_ptr, amax_ptr, packed_ptr, scales_ptr, ts_ptr, seed, NW,
                         X_FP32: tl.constexpr, USE_RHT: tl.constexpr, SR: tl.constexpr,
                         EMULATE_FMA: tl.constexpr, NB: tl.constexpr):
    """NB 16-blocks of flat x (words [NW]) -> packed bytes [NW], E4M3 scale bits [NW / 8], ts (program 0)."""
    pid = tl.program_id(0)
    blk = pid * NB + tl.arange(0, NB)                                   # [NB] flat block index
    offs = blk[:, None] * 8 + tl.arange(0, 8)[None, :]                  # [NB, 8] word == code byte index
    mask = offs < NW
    lo, hi = words_to_f32(tl.load(xw_ptr + offs, mask=mask, other=0), X_FP32)
    if USE_RHT:
        lo, hi = _rht_pairs(lo, hi, signs_ptr, NB)
    s_t = _tensor_scale(amax_ptr)
    sb, sb_bits = _scales(tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=1), s_t)
    s, r, smask = _block_factors(sb, s_t)
    s, r, smask = s[:, None], r[:, None], smask[:, None]
    if SR == 1:
        rw = tl.load(randw_ptr + offs, mask=mask, other=0)              # int64: the bits of both values
        r_lo, r_hi = (rw & 0xFFFFFFFF).to(tl.int32), (rw >> 32).to(tl.int32)
    elif SR == 2:                    # value e takes output e % 4 of Philox at counter e // 4 (word pair index)
        p0, p1, p2, p3 = tl.randint4x(seed, blk[:, None] * 4 + tl.arange(0, 4)[None, :])      # [NB, 4] each
        r_lo = (tl.reshape(tl.join(p0, p2), (NB, 8)) >> 8).to(tl.int32)    # even words: 0, 1; odd words: 2, 3
        r_hi = (tl.reshape(tl.join(p1, p3), (NB, 8)) >> 8).to(tl.int32)
    else:
        r_lo, r_hi = offs, offs
    tl.store(packed_ptr + offs, _code_bytes(lo, hi, s, r, smask, s_t, r_lo, r_hi, SR, EMULATE_FMA), mask=mask)
    tl.store(scales_ptr + blk, sb_bits.to(tl.uint8), mask=blk * 8 < NW)
    if pid == 0:
        tl.store(ts_ptr, s_t)


@triton.jit
def _per_tile(v, BR: tl.constexpr, BW: tl.constexpr):
    """[BR / 16, BW / 8] tile values -> [BR, BW] (each repeated over its 16 rows x 8 words)."""
    return tl.reshape(tl.broadcast_to(v[:, None, :, None], (BR // 16, 16, BW // 8, 8)), (BR, BW))


@triton.jit
def quantize_16x16_kernel(xw_ptr, amax_ptr, packed_ptr, scales_ptr, ts_ptr, M, KW, X_FP32: tl.constexpr,
                          EMULATE_FMA: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
    """2D blocks: one scale per 16x16 tile. x words [M, KW] (KW = K / 2); BR % 16 == 0, BW % 8 == 0."""
    pid_r, pid_w = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    words = pid_w * BW + tl.arange(0, BW)
    offs = rows[:, None] * KW + words[None, :]
    mask = (rows[:, None] < M) & (words[None, :] < KW)
    lo, hi = words_to_f32(tl.load(xw_ptr + offs, mask=mask, other=0), X_FP32)
    s_t = _tensor_scale(amax_ptr)
    a4 = tl.reshape(tl.maximum(tl.abs(lo), tl.abs(hi)), (BR // 16, 16, BW // 8, 8))
    sb, sb_bits = _scales(tl.max(tl.max(a4, axis=3), axis=1), s_t)                 # [BR/16, BW/8]
    s, r, smask = _block_factors(sb, s_t)
    s, r, smask = _per_tile(s, BR, BW), _per_tile(r, BR, BW), _per_tile(smask, BR, BW)
    tl.store(packed_ptr + offs, _code_bytes(lo, hi, s, r, smask, s_t, offs, offs, 0, EMULATE_FMA), mask=mask)
    srows = pid_r * (BR // 16) + tl.arange(0, BR // 16)
    scols = pid_w * (BW // 8) + tl.arange(0, BW // 8)
    tl.store(scales_ptr + srows[:, None] * (KW // 8) + scols[None, :], sb_bits.to(tl.uint8),
             mask=(srows[:, None] < M // 16) & (scols[None, :] < KW // 8))
    if pid_r + pid_w == 0:
        tl.store(ts_ptr, s_t)


@triton.jit
def philox_bits_kernel(out_ptr, seed, NG, BG: tl.constexpr):
    """The random bits quantize_1x16_kernel draws with SR == 2 (int32 [4 * NG]), for tests and debugging."""
    g = tl.program_id(0) * BG + tl.arange(0, BG)
    p0, p1, p2, p3 = tl.randint4x(seed, g)
    mask = g < NG
    tl.store(out_ptr + 4 * g, (p0 >> 8).to(tl.int32), mask=mask)
    tl.store(out_ptr + 4 * g + 1, (p1 >> 8).to(tl.int32), mask=mask)
    tl.store(out_ptr + 4 * g + 2, (p2 >> 8).to(tl.int32), mask=mask)
    tl.store(out_ptr + 4 * g + 3, (p3 >> 8).to(tl.int32), mask=mask)
