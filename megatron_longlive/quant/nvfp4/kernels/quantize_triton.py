"""Triton NVFP4 quantize kernels: 1x16 (optional RHT, optional stochastic rounding) and 16x16 tiles.

Each op follows reference.py step for step (see its docstring); the per-tensor amax is reduced by a
first pass (`amax_kernel`, which applies the RHT when asked so the amax is that of the transformed
tensor) and read by the quantize pass from device memory (no host sync). Random bits for stochastic
rounding are either given (int32 in [0, 2**24), shape of x) or drawn in-kernel from Philox with
`seed` at offset row * K + col (`philox_bits` returns exactly those bits).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import e2m1_encode, e4m3_round, fwht16_rows, pack_pairs

SR_NONE, SR_BITS, SR_PHILOX = 0, 1, 2


@triton.jit
def _load_tile(x_ptr, signs_ptr, rows, cols, K, mask, USE_RHT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """[BR, BK] fp32 tile of x (zeros outside `mask`), random-Hadamard-transformed per 16-block if asked."""
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if USE_RHT:
        s = tl.load(signs_ptr + (cols % 16)).to(tl.float32)
        x = tl.reshape(fwht16_rows(tl.reshape(x * s[None, :], (BR * BK // 16, 16)), BR * BK // 16), (BR, BK))
        x = x * 0.25
    return x


@triton.jit
def amax_kernel(x_ptr, signs_ptr, partial_ptr, M, K, USE_RHT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """partial[program] = max |RHT?(x)| over this program's [BR, BK] tile."""
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = _load_tile(x_ptr, signs_ptr, rows, cols, K, mask, USE_RHT, BR, BK)
    tl.store(partial_ptr + pid_r * tl.num_programs(1) + pid_k, tl.max(tl.max(tl.abs(x), axis=1), axis=0))


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
def _divide(x, scale):
    """Step 6: x / scale, 0 where scale == 0."""
    return tl.where(scale > 0, tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)), 0.0)


@triton.jit
def quantize_1x16_kernel(x_ptr, signs_ptr, rand_ptr, amax_ptr, packed_ptr, scales_ptr, ts_ptr, seed, M, K,
                         USE_RHT: tl.constexpr, SR: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = _load_tile(x_ptr, signs_ptr, rows, cols, K, mask, USE_RHT, BR, BK)          # [BR, BK]
    s_t = _tensor_scale(amax_ptr)
    # block scales [BR, BK/16]
    x3 = tl.reshape(x, (BR, BK // 16, 16))
    sb, sb_bits = _scales(tl.max(tl.abs(x3), axis=2), s_t)
    scale = sb * s_t
    y = tl.reshape(_divide(x3, scale[:, :, None]), (BR, BK))
    # random bits for stochastic rounding
    offs = rows[:, None] * K + cols[None, :]
    if SR == 1:
        r = tl.load(rand_ptr + offs, mask=mask, other=0)
    elif SR == 2:
        r = (tl.randint(seed, offs) >> 8).to(tl.int32)
    else:
        r = offs
    codes = e2m1_encode(y, r, SR != 0)
    # stores: packed [M, K/2], scales [M, K/16], tensor scale (program 0)
    pcols = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + pcols[None, :], pack_pairs(codes, BR, BK),
             mask=(rows[:, None] < M) & (pcols[None, :] < K // 2))
    scols = pid_k * (BK // 16) + tl.arange(0, BK // 16)
    tl.store(scales_ptr + rows[:, None] * (K // 16) + scols[None, :], sb_bits.to(tl.uint8),
             mask=(rows[:, None] < M) & (scols[None, :] < K // 16))
    if pid_r + pid_k == 0:
        tl.store(ts_ptr, s_t)


@triton.jit
def quantize_16x16_kernel(x_ptr, amax_ptr, packed_ptr, scales_ptr, ts_ptr, M, K,
                          BR: tl.constexpr, BK: tl.constexpr):
    """2D blocks: one scale per 16x16 tile; BR and BK are multiples of 16, M and K too."""
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s_t = _tensor_scale(amax_ptr)
    x4 = tl.reshape(x, (BR // 16, 16, BK // 16, 16))
    bmax = tl.max(tl.max(tl.abs(x4), axis=3), axis=1)                            # [BR/16, BK/16]
    sb, sb_bits = _scales(bmax, s_t)
    scale = sb * s_t
    y = tl.reshape(_divide(x4, scale[:, None, :, None]), (BR, BK))
    codes = e2m1_encode(y, y, False)
    pcols = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    tl.store(packed_ptr + rows[:, None] * (K // 2) + pcols[None, :], pack_pairs(codes, BR, BK),
             mask=(rows[:, None] < M) & (pcols[None, :] < K // 2))
    srows = pid_r * (BR // 16) + tl.arange(0, BR // 16)
    scols = pid_k * (BK // 16) + tl.arange(0, BK // 16)
    tl.store(scales_ptr + srows[:, None] * (K // 16) + scols[None, :], sb_bits.to(tl.uint8),
             mask=(srows[:, None] < M // 16) & (scols[None, :] < K // 16))
    if pid_r + pid_k == 0:
        tl.store(ts_ptr, s_t)


@triton.jit
def philox_bits_kernel(out_ptr, seed, M, K, BR: tl.constexpr, BK: tl.constexpr):
    """The random bits quantize_1x16_kernel draws with SR == 2, for tests and debugging."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    offs = rows[:, None] * K + cols[None, :]
    tl.store(out_ptr + offs, (tl.randint(seed, offs) >> 8).to(tl.int32),
             mask=(rows[:, None] < M) & (cols[None, :] < K))
