"""Triton NVFP4 dequantize kernel: x_hat = (e2m1_value * block_scale) * tensor_scale (reference order)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import e2m1_decode, e4m3_decode, unpack_pairs


@triton.jit
def dequantize_kernel(packed_ptr, scales_ptr, ts_ptr, out_ptr, M, K, ROWS_PER_SCALE: tl.constexpr,
                      OUT_BF16: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """packed [M, K/2], scales [M / ROWS_PER_SCALE, K/16] (1 for 1x16, 16 for 16x16 tiles) -> out [M, K].

    out is float32, or (OUT_BF16) bfloat16 bits in an int16 buffer, rounded to nearest even explicitly so
    that the interpreter and the GPU agree with torch's .to(torch.bfloat16)."""
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    pcols = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    p = tl.load(packed_ptr + rows[:, None] * (K // 2) + pcols[None, :],
                mask=(rows[:, None] < M) & (pcols[None, :] < K // 2), other=0)
    vals = e2m1_decode(unpack_pairs(p, BR, BK // 2))                               # [BR, BK]
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    sbits = tl.load(scales_ptr + (rows[:, None] // ROWS_PER_SCALE) * (K // 16) + cols[None, :] // 16,
                    mask=mask, other=0).to(tl.int32)
    out = (vals * e4m3_decode(sbits)) * tl.load(ts_ptr)
    if OUT_BF16:
        b = out.to(tl.int32, bitcast=True)
        out = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], out, mask=mask)
