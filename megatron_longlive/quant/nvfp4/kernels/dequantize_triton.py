"""Triton NVFP4 dequantize kernel: x_hat = (e2m1_value * block_scale) * tensor_scale (reference order).

Each code byte (two values) becomes one output word: two bf16 in an int32 (rounded to nearest even
explicitly, so the interpreter and the GPU agree with torch's .to(torch.bfloat16)) or two fp32 in an
int64. The block scale is decoded once per 16-block; 2 * value comes from a nibble table, so
(2 * value) * (scale / 2) is the exact product value * scale of the reference.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import e2m1_value_x2, e4m3_decode


@triton.jit
def _value_bits(c, half_scale, ts):
    """int32 codes -> fp32 bits of (value * block scale) * ts with the code's sign (code 8 -> -0.0)."""
    v = (e2m1_value_x2(c & 7) * half_scale) * ts
    return v.to(tl.int32, bitcast=True) | ((c & 8) << 28)


@triton.jit
def _bf16_bits(b):
    """fp32 bits -> bf16 bits (low 16 bits of an int32), round to nearest even."""
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def dequantize_kernel(packed_ptr, scales_ptr, ts_ptr, outw_ptr, M, KW, ROWS_PER_SCALE: tl.constexpr,
                      OUT_BF16: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
    """packed [M, KW] bytes (KW = K / 2), scales [M / ROWS_PER_SCALE, KW / 8] (1 for 1x16, 16 for 16x16
    tiles; 1x16 callers pass the flat tensor as M = 1) -> out words [M, KW]: int32 (bf16 pairs) or int64
    (fp32 pairs). BW % 8 == 0 and KW % 8 == 0."""
    pid_w, pid_r = tl.program_id(0), tl.program_id(1)                    # axis 0: the long one
    rows = pid_r * BR + tl.arange(0, BR)                                 # [BR]
    blks = pid_w * (BW // 8) + tl.arange(0, BW // 8)                     # [BW / 8] blocks of the row
    smask = (rows[:, None] < M) & (blks[None, :] * 8 < KW)
    offs = (rows[:, None] * KW + blks[None, :] * 8)[:, :, None] + tl.arange(0, 8)[None, None, :]
    p = tl.load(packed_ptr + offs, mask=smask[:, :, None], other=0).to(tl.int32)     # [BR, BW/8, 8]
    sbits = tl.load(scales_ptr + (rows[:, None] // ROWS_PER_SCALE) * (KW // 8) + blks[None, :], mask=smask,
                    other=0).to(tl.int32)
    hs = (e4m3_decode(sbits) * 0.5)[:, :, None]                         # exact: E4M3 >= 2**-9
    ts = tl.load(ts_ptr)
    lo, hi = _value_bits(p & 15, hs, ts), _value_bits(p >> 4, hs, ts)
    if OUT_BF16:
        word = _bf16_bits(lo) | (_bf16_bits(hi) << 16)
    else:
        word = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
    tl.store(outw_ptr + offs, word, mask=smask[:, :, None])
