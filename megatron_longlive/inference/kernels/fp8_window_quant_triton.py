"""Fused E4M3 quantizer of the window attention's FP8 mode: one read and one write per tensor (CUDA; CPU tests run
it under TRITON_INTERPRET=1). Bitwise equal to the torch quantizer `window_attention_triton.quantize_fp8_torch`:
the same IEEE fp32 divisions (div_rn) and nearest-even E4M3 casts.

    rows:  q or K [B, S, H, D] (K minus its smoothing vector [B, H, D]) -> E4M3 [B, S, H, D] + fp32 scale [B, S, H]
           = max|row| / 448 (amax in-kernel)
    v:     V [B, S, H, D] + its per-channel amax [B, H, D] (a torch reduction) -> E4M3 in [B, H, D, S] memory
           (transposed: the K-major PV operand of the attention kernel) + fp32 scale amax / 448
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...quant.ieee import div_rn
from ...quant.nvfp4.kernels.triton_common import e4m3_round

E4M3_MAX = 448.0
TINY = 1.1754943508222875e-38          # smallest normal fp32: a row with amax below it gets scale 1
_E4M3_MAX = tl.constexpr(E4M3_MAX)     # (Triton kernels read globals only as constexpr)
_TINY = tl.constexpr(TINY)


def e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 (IEEE division, as the kernels' div_rn), 1 where amax is below the smallest normal fp32 (an
    all-zero row keeps zero codes under any scale)."""
    return torch.where(amax > TINY, div_rn(amax, E4M3_MAX), torch.ones_like(amax))


@triton.jit
def _to_e4m3(y, INTERPRET: tl.constexpr):
    """fp32 in [-448, 448] -> float8e4nv, nearest even (the interpreter's own cast is wrong across binades)."""
    if INTERPRET:
        val, _ = e4m3_round(tl.abs(y))
        y = tl.where(y < 0, -val, val)
    return y.to(tl.float8e4nv)


@triton.jit(do_not_specialize=["rows_per_b"])
def _quantize_rows_kernel(x_ptr, sub_ptr, out_ptr, scale_ptr, rows_per_b, H, sxb, sob, D: tl.constexpr,
                          BLOCK_R: tl.constexpr, HAS_SUB: tl.constexpr, INTERPRET: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    m = r < rows_per_b
    x = tl.load(x_ptr + b * sxb + r[:, None] * D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    if HAS_SUB:                                   # K smoothing: minus a per-(batch, head) channel vector
        x = x - tl.load(sub_ptr + (b * H + r[:, None] % H) * D + d[None, :], mask=m[:, None], other=0.0)
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.where(amax > _TINY, tl.math.div_rn(amax, tl.full(amax.shape, _E4M3_MAX, tl.float32)), 1.0)
    y = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    tl.store(out_ptr + b * sob + r[:, None] * D + d[None, :], _to_e4m3(y, INTERPRET), mask=m[:, None])
    tl.store(scale_ptr + b * rows_per_b + r, s, mask=m)


@triton.jit          # S stays specialized (16-divisible S: aligned, vectorized V^T stores)
def _quantize_v_kernel(v_ptr, scale_ptr, out_ptr, S, H, svb, svs, svh, D: tl.constexpr, BLOCK_S: tl.constexpr,
                       INTERPRET: tl.constexpr):
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    m = offs_s < S
    x = tl.load(v_ptr + b * svb + h * svh + offs_s[:, None] * svs + d[None, :], mask=m[:, None], other=0.0)
    s = tl.load(scale_ptr + pid_bh * D + d)
    y = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(s[None, :], (BLOCK_S, D)))
    tl.store(out_ptr + pid_bh * D * S + d[None, :] * S + offs_s[:, None], _to_e4m3(y, INTERPRET), mask=m[:, None])


def quantize_rows(x: torch.Tensor, interpret: bool, sub: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H, D] (minus sub [B, H, D] fp32, if given) -> (E4M3 [B, S, H, D], fp32 scale [B, S, H])."""
    bsz, s, h, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(1) != h * d:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(bsz, s, h, dtype=torch.float32, device=x.device)
    block_r = 32 if interpret else 64
    if sub is not None:
        assert sub.shape == (bsz, h, d) and sub.dtype == torch.float32 and sub.is_contiguous()
    _quantize_rows_kernel[(triton.cdiv(s * h, block_r), bsz)](
        x, sub if sub is not None else scale, out, scale, s * h, h, x.stride(0), out.stride(0), D=d, BLOCK_R=block_r,
        HAS_SUB=sub is not None, INTERPRET=interpret, num_warps=4)
    return out, scale


def quantize_v(v: torch.Tensor, interpret: bool, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H, D] with its per-channel amax [B, H, D] fp32 -> (E4M3 [B, S, H, D] view of [B, H, D, S] memory,
    fp32 scale [B, H, D])."""
    bsz, s, h, d = v.shape
    if v.stride(3) != 1:
        v = v.contiguous()
    scale = e4m3_scale(amax)
    out = torch.empty(bsz, h, d, s, dtype=torch.float8_e4m3fn, device=v.device)
    block_s = 32 if interpret else 64
    _quantize_v_kernel[(triton.cdiv(s, block_s), bsz * h)](v, scale, out, s, h, v.stride(0), v.stride(1), v.stride(2),
                                                           D=d, BLOCK_S=block_s, INTERPRET=interpret, num_warps=4)
    return out.permute(0, 3, 1, 2), scale
