"""Triton FP8 quantizer for the FP8 linear: one tensor -> its rowwise AND its transposed-rowwise E4M3 copies.

A GEMM operand t [M, K] is needed quantized along K (fprop/dgrad) and, transposed, along M (wgrad). The
column scales reduce over all M tokens, so they exist only after t has been read once: the floor for this
recipe is 2 reads (2 bytes each) + 2 one-byte writes = 6 bytes per value, and these kernels do exactly that.

  pass 1 `_stats_kernel`    reads t once: row amaxes [M] and column amaxes [K] (atomic max; each program
                            walks ROW_TILES row tiles of one column strip, so one column atomic per strip),
                            and optionally fp32 column sums per 512-token strip (the bias gradient of dy; a
                            fixed reduction order per tile config, so run-to-run deterministic).
  pass 2 `_quantize_kernel` reads t once more, writes q_row [M, K] (scale amax_row / 448) and q_colT [K, MP]
                            (scale amax_col / 448, the transpose, zero-padded to MP = ceil(M/pad)*pad tokens;
                            the linears pass fp8.TOKEN_PAD = 128 for activations).

Codes are e4m3_rne(clamp(v * (448 / amax), -448, 448)): one IEEE division per row/column, then a multiply
per value. On the GPU the rounding is the hardware cvt.rn.satfinite (HW_CAST); the interpreter (CPU tests)
uses the explicit nearest-even bit arithmetic of triton_common.e4m3_round. Both equal fp8.quantize_rowwise(t)
and fp8.quantize_rowwise(pad(t^T)) bit for bit (tests/unit/test_fp8_triton.py, tests/gpu/test_fp8_gpu.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nvfp4.kernels.triton_common import e4m3_round

STRIP = 512                              # tokens per stats program (fixed: one column-sum row per strip)
BM, BK = 128, 64                         # interpreter tiles; on CUDA both kernels are autotuned (below)
SBM, SBK, ROW_TILES = 64, 128, STRIP // 64


@triton.jit
def _stats_kernel(x_ptr, row_amax_ptr, col_amax_ptr, col_sum_ptr, rfold_ptr, cfold_ptr, M, K, M_KEY,
                  BM: tl.constexpr, BK: tl.constexpr, ROW_TILES: tl.constexpr, COL_SUM: tl.constexpr,
                  FOLD: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    cmax = tl.zeros([BK], dtype=tl.float32)
    csum = tl.zeros([BK], dtype=tl.float32)
    if FOLD:
        rfold = tl.load(rfold_ptr + cols, mask=cols < K, other=0.0)
    for i in range(ROW_TILES):
        rows = (pid_m * ROW_TILES + i) * BM + tl.arange(0, BM)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
        if FOLD:        # row layout of x * rfold[k], column layout of x * cfold[m] (fp8_channel's weights)
            xr = x * rfold[None, :]
            xc = x * tl.load(cfold_ptr + rows, mask=rows < M, other=0.0)[:, None]
        else:
            xr = x
            xc = x
        # amaxes are >= 0, so their fp32 bits order like int32: one relaxed integer atomic per value
        tl.atomic_max(row_amax_ptr + rows, tl.max(tl.abs(xr), axis=1).to(tl.int32, bitcast=True), mask=rows < M,
                      sem="relaxed")
        cmax = tl.maximum(cmax, tl.max(tl.abs(xc), axis=0))
        if COL_SUM:
            csum += tl.sum(x, axis=0)
    store_column_stats(col_amax_ptr, col_sum_ptr, pid_m, cols, K, cmax, csum, COL_SUM)


@triton.jit
def store_column_stats(amax_ptr, sum_ptr, pid_m, cols, K, cmax, csum, COL_SUM: tl.constexpr):
    """A strip program's column amaxes (relaxed integer atomic max of the fp32 bits: amaxes are >= 0, so
    their bits order like int32) and, with COL_SUM, its fp32 column sums as row pid_m of sum_ptr [strips, K]."""
    tl.atomic_max(amax_ptr + cols, cmax.to(tl.int32, bitcast=True), mask=cols < K, sem="relaxed")
    if COL_SUM:
        tl.store(sum_ptr + pid_m * K + cols, csum, mask=cols < K)


@triton.jit
def _e4m3_bits(v, HW_CAST: tl.constexpr):
    """uint8 E4M3 bits of clamp(v, -448, 448), nearest even."""
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if HW_CAST:
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    _, bits = e4m3_round(tl.abs(v))
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return (bits | (sign << 7)).to(tl.uint8)


@triton.jit
def _scale_and_inverse(amax):
    """(decode scale amax / 448, encode multiplier 448 / amax); (1, 1) for an all-zero row."""
    pos = amax > 0
    inverse = tl.math.div_rn(tl.zeros_like(amax) + 448.0, amax)
    return tl.where(pos, tl.math.div_rn(amax, 448.0), 1.0), tl.where(pos, inverse, 1.0)


@triton.jit
def _quantize_kernel(x_ptr, row_amax_ptr, col_amax_ptr, qrow_ptr, qcol_ptr, srow_ptr, scol_ptr, rfold_ptr, cfold_ptr,
                     M, K, MP, M_KEY, BM: tl.constexpr, BK: tl.constexpr, HW_CAST: tl.constexpr, FOLD: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if FOLD:
        xr = x * tl.load(rfold_ptr + cols, mask=cols < K, other=0.0)[None, :]
        xc = x * tl.load(cfold_ptr + rows, mask=rows < M, other=0.0)[:, None]
    else:
        xr = x
        xc = x
    row_amax = tl.load(row_amax_ptr + rows, mask=rows < M, other=0).to(tl.float32, bitcast=True)   # [BM]
    col_amax = tl.load(col_amax_ptr + cols, mask=cols < K, other=0).to(tl.float32, bitcast=True)   # [BK]
    srow, irow = _scale_and_inverse(row_amax)
    scol, icol = _scale_and_inverse(col_amax)
    tl.store(qrow_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], _e4m3_bits(xr * irow[:, None], HW_CAST),
             mask=inside)
    qc = tl.trans(_e4m3_bits(xc * icol[None, :], HW_CAST))                                      # [BK, BM]
    tl.store(qcol_ptr + cols[:, None].to(tl.int64) * MP + rows[None, :], qc,
             mask=(cols[:, None] < K) & (rows[None, :] < MP))
    if pid_k == 0:
        tl.store(srow_ptr + rows, srow, mask=rows < M)
    if pid_m == 0:
        tl.store(scol_ptr + cols, scol, mask=cols < K)


# Autotuned launchers for CUDA (M_KEY = bit length of M: one tuning per token-count octave and width). Both
# kernels are idempotent (max atomics of the same values, stores), so tuning re-runs on the live buffers are
# harmless; every stats config covers STRIP tokens per program, so all configs write the same column-sum rows.
def _quick_bench(fn, quantiles):
    """Autotuning timer: short (a few ms per config), so first calls of a new shape stay cheap."""
    return triton.testing.do_bench(fn, warmup=3, rep=15, quantiles=quantiles)


_stats_tuned = triton.autotune(
    [triton.Config({"BM": bm, "BK": bk, "ROW_TILES": STRIP // bm}, num_warps=w)
     for bm, bk, w in ((64, 128, 8), (32, 256, 8))],
    key=["M_KEY", "K"], do_bench=_quick_bench)(_stats_kernel)
_quantize_tuned = triton.autotune(
    [triton.Config({"BM": bm, "BK": bk}, num_warps=w) for bm, bk, w in ((128, 64, 8), (128, 128, 8), (64, 128, 4))],
    key=["M_KEY", "K"], do_bench=_quick_bench)(_quantize_kernel)


def _hw_cast(t: torch.Tensor) -> bool:
    """Hardware E4M3 rounding on a real GPU; the interpreter's fp8 cast is not nearest-even."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


def quantize_both(t: torch.Tensor, col_sum: bool = False, hw_cast: bool | None = None,
                  fold: tuple[torch.Tensor, torch.Tensor] | None = None, pad: int = 16):
    """t [M, K] -> (q_row [M, K] e4m3, s_row [M, 1], q_colT [K, MP] e4m3, s_col [K, 1], fp32 scales), plus
    the fp32 column sums [K] of t (the bias gradient when t is dy) as a fifth item when col_sum.
    fold = (rfold [K], cfold [M]) fp32: the row layout quantizes t * rfold[None, :] and the column layout
    t * cfold[:, None] (the channel recipe's weights, fp8_channel.py); not with col_sum.
    hw_cast: None = hardware rounding where it runs (CUDA, not interpreted); False forces the bit path."""
    t = t.contiguous()
    m, k = t.shape
    mp = (m + pad - 1) // pad * pad            # the transposed copy's tokens (fp8.TOKEN_PAD for activations)
    dev = t.device
    hw = _hw_cast(t) if hw_cast is None else hw_cast
    amaxes = torch.zeros(m + k, dtype=torch.int32, device=dev)          # fp32 bits, see _stats_kernel; one fill
    row_amax, col_amax = amaxes[:m], amaxes[m:]
    strips = triton.cdiv(m, STRIP)
    sums = torch.empty(strips if col_sum else 1, k, dtype=torch.float32, device=dev)
    q_row = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=dev)
    q_col = torch.empty(k, mp, dtype=torch.float8_e4m3fn, device=dev)
    s_row = torch.empty(m, 1, dtype=torch.float32, device=dev)
    s_col = torch.empty(k, 1, dtype=torch.float32, device=dev)
    if fold is not None and col_sum:
        raise ValueError("quantize_both: fold and col_sum do not combine (a folded t is a weight, no bias gradient)")
    rfold, cfold = (f.float().contiguous() for f in fold) if fold is not None else (s_row, s_row)
    stats_args = (t, row_amax, col_amax, sums, rfold, cfold, m, k, m.bit_length())
    quant_args = (t, row_amax, col_amax, q_row.view(torch.uint8), q_col.view(torch.uint8), s_row, s_col, rfold,
                  cfold, m, k, mp, m.bit_length())
    flags = dict(FOLD=fold is not None)
    if _hw_cast(t):
        _stats_tuned[lambda c: (strips, triton.cdiv(k, c["BK"]))](*stats_args, COL_SUM=col_sum, **flags)
        _quantize_tuned[lambda c: (triton.cdiv(mp, c["BM"]), triton.cdiv(k, c["BK"]))](*quant_args, HW_CAST=hw,
                                                                                       **flags)
    else:
        _stats_kernel[(strips, triton.cdiv(k, SBK))](*stats_args, BM=SBM, BK=SBK, ROW_TILES=ROW_TILES,
                                                     COL_SUM=col_sum, num_warps=8, **flags)
        _quantize_kernel[(triton.cdiv(mp, BM), triton.cdiv(k, BK))](*quant_args, BM=BM, BK=BK, HW_CAST=hw,
                                                                    num_warps=8, **flags)
    out = (q_row, s_row, q_col, s_col)
    return out + (sums.sum(0),) if col_sum else out
