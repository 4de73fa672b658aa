"""Merge the outputs of attention over P disjoint parts of the keys into the attention over all of them (issue 9).

cuDNN's FP8 attention at the 1.3B chunk shape launches 444 query tiles on 132 SMs (3.4 waves, the last one mostly
idle); run over the window's key halves as two batch entries it fills 6.7 of 7 waves. Each part p returns its own
softmax-normalized output O_p and its log-sum-exp L_p (cuDNN's Stats: the row max plus the log of the row sum of
exp, natural log, of the scaled scores), and

    O = sum_p O_p * exp(L_p - L),   L = log sum_p exp(L_p)

exactly (the usual flash-decoding merge). The kernel also decodes an E4M3 output (1 / o_scale) and applies V's
per-head scales, so the unsplit call (P = 1) uses it too, in one pass instead of three eager ones:

    parts   [P, B, Sq, H, D]  bf16 or float8_e4m3fn, contiguous
    lse     [P, B, H, Sq]     fp32 (ignored when P = 1)
    v_scale [H]               fp32
    -> out  [B, Sq, H, D]     bf16:  sum_p parts[p] / o_scale * w_p * v_scale[h]

`combine_torch` is the same math in torch (float32), for the CPU and the tests.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["rows"])
def _combine_kernel(parts_ptr, lse_ptr, vs_ptr, out_ptr, rows, Sq, H, part_stride, lse_stride, inv_o_scale,
                    P: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)        # row = (b, s, h), the memory order of parts and out
    m = r < rows
    h = r % H
    bs = r // H
    b, s = bs // Sq, bs % Sq
    d = tl.arange(0, D)
    off = r.to(tl.int64)[:, None] * D + d[None, :]
    scale = tl.load(vs_ptr + h, mask=m, other=1.0) * inv_o_scale
    if P == 1:
        acc = tl.load(parts_ptr + off, mask=m[:, None], other=0.0).to(tl.float32)
    else:
        lse_off = (b * H + h).to(tl.int64) * Sq + s
        top = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for p in tl.static_range(P):
            top = tl.maximum(top, tl.load(lse_ptr + p * lse_stride + lse_off, mask=m, other=0.0))
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for p in tl.static_range(P):
            w = tl.exp(tl.load(lse_ptr + p * lse_stride + lse_off, mask=m, other=0.0) - top)
            total += w
            o = tl.load(parts_ptr + p * part_stride + off, mask=m[:, None], other=0.0).to(tl.float32)
            acc += o * w[:, None]
        scale = scale / total
    tl.store(out_ptr + off, (acc * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m[:, None])


def _check(parts: torch.Tensor, lse: torch.Tensor | None, v_scale: torch.Tensor) -> None:
    if parts.dim() != 5 or not parts.is_contiguous() or parts.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        raise ValueError(f"split-KV combine: parts must be a contiguous bf16/float8_e4m3fn [P, B, Sq, H, D] tensor, "
                         f"got {parts.dtype} {tuple(parts.shape)} strides {parts.stride()}")
    p, b, sq, h, d = parts.shape
    if p > 1 and (lse is None or lse.shape != (p, b, h, sq) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"split-KV combine: {p} parts need contiguous fp32 log-sum-exps [P, B, H, Sq] = "
                         f"{(p, b, h, sq)}, got {None if lse is None else (lse.dtype, tuple(lse.shape))}")
    if v_scale.shape != (h,) or v_scale.dtype != torch.float32:
        raise ValueError(f"split-KV combine: v_scale must be fp32 [H={h}], got {v_scale.dtype} {tuple(v_scale.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"split-KV combine: head_dim {d} must be a power of two >= 16")


def combine_torch(parts: torch.Tensor, lse: torch.Tensor | None, v_scale: torch.Tensor, o_scale: float = 1.0,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference merge in float32 (any device): [P, B, Sq, H, D] parts -> [B, Sq, H, D]."""
    o = parts.float() / o_scale
    if parts.shape[0] > 1:
        w = torch.softmax(lse.float(), dim=0).transpose(2, 3)[..., None]     # [P, B, Sq, H, 1]
        o = (o * w).sum(0)
    else:
        o = o[0]
    return (o * v_scale.float()[:, None]).to(out_dtype)


def combine_split_kv(parts: torch.Tensor, lse: torch.Tensor | None, v_scale: torch.Tensor, o_scale: float = 1.0,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Merge P key-part attention outputs (see the module docstring); Triton on CUDA and under TRITON_INTERPRET=1,
    `combine_torch` on the CPU."""
    _check(parts, lse, v_scale)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (parts.is_cuda or interpret):
        return combine_torch(parts, lse, v_scale, o_scale, out_dtype)
    p, b, sq, h, d = parts.shape
    out = torch.empty((b, sq, h, d), dtype=out_dtype, device=parts.device)
    rows = b * sq * h
    if rows == 0:
        return out
    block_r = 16 if interpret else 32
    lse_arg = lse if lse is not None else v_scale          # unread when P = 1
    _combine_kernel[(triton.cdiv(rows, block_r),)](
        parts, lse_arg, v_scale.contiguous(), out, rows, sq, h, b * sq * h * d, b * h * sq, 1.0 / o_scale,
        P=p, D=d, BLOCK_R=block_r, num_warps=4)
    return out
