"""Triton E4M3 quantizer of a conv input into the padded row buffer of reference.py (one fp32 scale per tensor).

  `_amax_kernel`     reads x once (bf16: 2 B/value): max |x| into an int32 word (fp32 bits; amaxes are >= 0, so
                     their bits order like int32) by one relaxed atomic per program; no host sync.
  `_quantize_kernel` reads x again (2 B/value) and writes every byte of buf [G + N*T*Hp*Wp, Cp] (1 B/value plus
                     the zero border, guard rows and channel padding), so buf needs no memset.
Bytes per value: 5 (2 + 2 + 1; 3 when the caller gives a static amax bound and the first kernel is skipped),
against 2 for the read cuDNN's BF16 conv does anyway. Wan2.2 at 704p, 32 frames: the full-resolution 256-channel
conv input is ~1.9 G values, ~3 ms of HBM at 3.35 TB/s (dynamic scale), vs ~23 ms of FP8 MMA for its 3x3x3 conv
at 1100 TFLOP/s (~40 ms BF16): cheap there, but not for narrow or 1x1x1 convs (module.py's selection rule).

Codes are e4m3_rne(clamp(x * (448 / amax), +-448)) with scale amax / 448: hardware cvt.rn.satfinite on CUDA,
the explicit nearest-even bit arithmetic under TRITON_INTERPRET (whose own fp8 cast rounds wrongly); bitwise
equal to reference.quantize_activation (tests/unit/test_fp8_conv.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..fp8_triton import _e4m3_bits


@triton.jit
def act_scale_from_bits(amax_ptr):
    """(decode scale amax / 448, encode multiplier 448 / amax) from the amax word; (1, 1) for an all-zero input."""
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    pos = amax > 0
    safe = tl.where(pos, amax, 1.0)
    return (tl.where(pos, tl.math.div_rn(safe, 448.0), 1.0),
            tl.where(pos, tl.math.div_rn(tl.full([], 448.0, tl.float32), safe), 1.0))


@triton.jit(do_not_specialize=["numel"])
def _amax_kernel(x_ptr, amax_ptr, numel, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = (pid.to(tl.int64) * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.abs(tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)))
    tl.atomic_max(amax_ptr, tl.max(m, axis=0).to(tl.int32, bitcast=True), sem="relaxed")


@triton.jit(do_not_specialize=["ROWS", "G", "T", "H", "W", "PH", "PW"])
def _quantize_kernel(x_ptr, amax_ptr, buf_ptr, ROWS, G, T, H, W, C, CP, PH, PW,
                     BR: tl.constexpr, BC: tl.constexpr, HW_CAST: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)                     # buffer rows
    cols = pid_c * BC + tl.arange(0, BC)
    hp, wp = H + 2 * PH, W + 2 * PW
    i = rows - G                                             # position on the padded grid (n, t, hp, wp)
    frame = i // (hp * wp)                                   # n * T + t
    rem = i % (hp * wp)
    h = rem // wp - PH
    w = rem % wp - PW
    # rows past ROWS (the last block's tail) would map to frames after x's end: masked, never read
    inside = (i >= 0) & (rows < ROWS) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = (frame.to(tl.int64) * H + h) * W + w               # row of x viewed as [N*T*H*W, C]
    x = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=inside[:, None] & (cols[None, :] < C),
                other=0.0).to(tl.float32)
    _, inv = act_scale_from_bits(amax_ptr)
    q = _e4m3_bits(x * inv, HW_CAST)                         # zeros stay +0.0 (byte 0)
    tl.store(buf_ptr + rows[:, None].to(tl.int64) * CP + cols[None, :], q,
             mask=(rows[:, None] < ROWS) & (cols[None, :] < CP))
