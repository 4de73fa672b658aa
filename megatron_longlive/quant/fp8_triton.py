"""Triton FP8 quantizer for the FP8 linear: one tensor -> its rowwise AND its transposed-rowwise E4M3 copies.

A GEMM operand t [M, K] is needed quantized along K (fprop/dgrad) and, transposed, along M (dgrad/wgrad).
Pass 1 reads t once and reduces both the row amaxes [M] and the column amaxes [K] (atomic max). Pass 2
reads t once more and writes q_row [M, K] (scale amax_row / 448) and q_colT [K, MP] (scale amax_col / 448,
the transpose, zero-padded to MP = ceil(M/16)*16 tokens). 2 reads + 2 one-byte writes per value, instead
of a transpose copy and two separate quantizations. Results equal fp8.quantize_rowwise(t) and
fp8.quantize_rowwise(pad(t^T)) bit for bit (IEEE division, explicit E4M3 nearest-even rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nvfp4.kernels.triton_common import e4m3_round

BM, BK = 64, 64


@triton.jit
def _amax_kernel(x_ptr, row_amax_ptr, col_amax_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    a = tl.abs(tl.load(x_ptr + rows[:, None] * K + cols[None, :],
                       mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32))
    tl.atomic_max(row_amax_ptr + rows, tl.max(a, axis=1), mask=rows < M)
    tl.atomic_max(col_amax_ptr + cols, tl.max(a, axis=0), mask=cols < K)


@triton.jit
def _e4m3_bits(x, scale):
    """Signed E4M3 bits of clamp(x / scale, -448, 448) with nearest-even rounding."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    _, bits = e4m3_round(tl.abs(v))
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return (bits | (sign << 7)).to(tl.uint8)


@triton.jit
def _scale(amax):
    return tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)


@triton.jit
def _quantize_kernel(x_ptr, row_amax_ptr, col_amax_ptr, qrow_ptr, qcol_ptr, srow_ptr, scol_ptr, M, K, MP,
                     BM: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    srow = _scale(tl.load(row_amax_ptr + rows, mask=rows < M, other=0.0))              # [BM]
    scol = _scale(tl.load(col_amax_ptr + cols, mask=cols < K, other=0.0))              # [BK]
    tl.store(qrow_ptr + rows[:, None] * K + cols[None, :], _e4m3_bits(x, srow[:, None]), mask=inside)
    qc = tl.trans(_e4m3_bits(x, scol[None, :]))                                         # [BK, BM]
    tl.store(qcol_ptr + cols[:, None] * MP + rows[None, :], qc, mask=(cols[:, None] < K) & (rows[None, :] < MP))
    if pid_k == 0:
        tl.store(srow_ptr + rows, srow, mask=rows < M)
    if pid_m == 0:
        tl.store(scol_ptr + cols, scol, mask=cols < K)


def quantize_both(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """t [M, K] -> (q_row [M, K] e4m3, s_row [M, 1], q_colT [K, MP] e4m3, s_col [K, 1]), fp32 scales."""
    t = t.contiguous()
    m, k = t.shape
    mp = (m + 15) // 16 * 16
    row_amax = torch.zeros(m, dtype=torch.float32, device=t.device)
    col_amax = torch.zeros(k, dtype=torch.float32, device=t.device)
    q_row = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=t.device)
    q_col = torch.empty(k, mp, dtype=torch.float8_e4m3fn, device=t.device)
    s_row = torch.empty(m, 1, dtype=torch.float32, device=t.device)
    s_col = torch.empty(k, 1, dtype=torch.float32, device=t.device)
    _amax_kernel[(triton.cdiv(m, BM), triton.cdiv(k, BK))](t, row_amax, col_amax, m, k, BM=BM, BK=BK)
    _quantize_kernel[(triton.cdiv(mp, BM), triton.cdiv(k, BK))](t, row_amax, col_amax, q_row.view(torch.uint8),
                                                                q_col.view(torch.uint8), s_row, s_col, m, k, mp,
                                                                BM=BM, BK=BK)
    return q_row, s_row, q_col, s_col
