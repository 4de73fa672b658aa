"""E4M3 quantization with one fp32 scale per (group, head), for the FP8 shadow of the KV window (issue 9).

    x     [G, B, S, H, D]  any float dtype; H and D contiguous (stride D and 1), G, B, S strided
    scale [G, H]           fp32 (x ~ code * scale); G = layers for a whole-cache pass, 1 for one layer's tensor
    ->    E4M3 codes of clamp(x / scale, +-448) (IEEE division, nearest even), written into `out` (same shape,
          its own G, B, S strides)

One read and one write per value (no fp32 temporaries of the window). `quantize_per_head_torch` is the same
arithmetic in torch (any device): the kernel equals it bitwise, on CUDA and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8_window_quant_triton import E4M3_MAX, _to_e4m3

_E4M3_MAX = tl.constexpr(E4M3_MAX)


@triton.jit(do_not_specialize=["rows"])
def _quantize_heads_kernel(x_ptr, out_ptr, scale_ptr, rows, S, H, sxg, sxb, sxs, sog, sob, sos,
                           D: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    pid, g = tl.program_id(0), tl.program_id(1)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)        # row = (b, s, h) of group g
    m = r < rows
    h = r % H
    bs = r // H
    b, s = bs // S, bs % S
    d = tl.arange(0, D)
    xo = g.to(tl.int64) * sxg + b.to(tl.int64) * sxb + s.to(tl.int64) * sxs + h * D
    x = tl.load(x_ptr + xo[:, None] + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + g * H + h, mask=m, other=1.0)
    y = tl.math.div_rn(x, tl.broadcast_to(sc[:, None], x.shape))
    y = tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX)
    oo = g.to(tl.int64) * sog + b.to(tl.int64) * sob + s.to(tl.int64) * sos + h * D
    tl.store(out_ptr + oo[:, None] + d[None, :], _to_e4m3(y, INTERPRET), mask=m[:, None])


def _check(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    if x.dim() != 5 or out.shape != x.shape or out.dtype != torch.float8_e4m3fn:
        raise ValueError(f"quantize_per_head: x {tuple(x.shape)} and out {tuple(out.shape)} {out.dtype} must be "
                         f"[G, B, S, H, D], out float8_e4m3fn")
    g, _, _, h, d = x.shape
    if scale.shape != (g, h) or scale.dtype != torch.float32:
        raise ValueError(f"quantize_per_head: scale must be fp32 [G={g}, H={h}], got {scale.dtype} {tuple(scale.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"quantize_per_head: head_dim {d} must be a power of two >= 16")
    for name, t in (("x", x), ("out", out)):
        if t.stride(4) != 1 or t.stride(3) != d:
            raise ValueError(f"quantize_per_head: {name} needs contiguous heads and channels, strides {t.stride()}")


def quantize_per_head_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: E4M3 codes [G, B, S, H, D] of x / scale[G, None, None, H, None], saturated at +-448."""
    y = x.float() / scale[:, None, None, :, None].expand_as(x)         # a tensor divisor: IEEE division on CUDA too
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_per_head(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 codes of x [G, B, S, H, D] with one fp32 scale per (group, head) [G, H], into `out` (allocated when
    None). Triton on CUDA and under TRITON_INTERPRET=1, the torch reference otherwise (CPU)."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    _check(x, scale, out)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.is_cuda or interpret):
        out.copy_(quantize_per_head_torch(x, scale))
        return out
    g, b, s, h, d = x.shape
    rows = b * s * h
    if rows == 0:
        return out
    block_r = 32 if interpret else 64
    _quantize_heads_kernel[(triton.cdiv(rows, block_r), g)](
        x, out, scale.contiguous(), rows, s, h, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), D=d, BLOCK_R=block_r, INTERPRET=interpret, num_warps=4)
    return out
