"""One-pass Triton quantizer of the channel-scaled FP8 recipe (fp8_channel.py): t [M, K] -> both E4M3 layouts.

With one scale per channel (column) known before the call (delayed scaling: from earlier steps' amaxes), every
code is pointwise, q[m, k] = e4m3_rne(clamp(t[m, k] * inv[k], -448, 448)), and the same codes serve the GEMM
that reduces over K (fprop/dgrad: the channel scale is folded into the weight) and, transposed, the one that
reduces over M (wgrad). So one read of t and two one-byte writes (4 bytes per value instead of the rowwise
recipe's 6): q [M, K], q^T [K, MP] (zero-padded to MP = ceil(M/pad)*pad tokens, fp8.TOKEN_PAD = 128 by default:
the wgrad's reduction length), plus this call's column amaxes
(a relaxed integer atomic max into `amax_bits`, the fp32 bits: the next steps' scales) and, for dy, fp32 column
sums per STRIP tokens (the bias gradient; fixed order, so deterministic). The strips cover all MP tokens, so the
padding of q^T is written (zeros) by the kernel itself.

Producer fusion: `op` applies the FFN's pointwise step before quantizing, so that tensor never exists in BF16:
"gelu" turns fc1's output h into fc2's codes (forward), "gelu_backward" turns the gradient at the GELU output and h
into fc1's dy codes (backward). Each reads and writes as many bytes as the BF16 GELU kernel it replaces.

Equal bit for bit to fp8_channel.quantize_channelwise_torch (tests/unit/test_fp8_channel_triton.py; on the GPU
tests/gpu/test_fp8_gpu.py); with an op, the kernel's tanh (from exp) can put a BF16 value one ulp from eager's
and its code one E4M3 step away (rare; measured in the same tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8_conv.conv_triton import _round_bf16
from .fp8_gelu_quant_triton import _C, _gelu_bf16
from .fp8 import TOKEN_PAD
from .fp8_triton import _e4m3_bits, _hw_cast, _quick_bench, _scale_and_inverse, store_column_stats

STRIP = 512                     # tokens per program (one column atomic and one column-sum row per strip)
BM, BK = 64, 64                 # interpreter tiles; autotuned on CUDA


OPS = {"identity": 0, "gelu": 1, "gelu_backward": 2}


@triton.jit
def _gelu_grad(h):
    """d gelu_tanh(h) / dh in fp32, term by term as ATen's GELU backward."""
    h2 = h * h
    t = 1.0 - 2.0 / (tl.exp(2.0 * (_C * (h + 0.044715 * h2 * h))) + 1.0)      # tanh, saturating without NaN
    return 0.5 * (1.0 + t) + (0.5 * h) * (1.0 - t * t) * (_C * (1.0 + 3.0 * 0.044715 * h2))


@triton.jit
def _e4m3_bits_cvt(v):
    """uint8 E4M3 bits of clamp(v, -448, 448), nearest even, one PTX cvt per value: the pair form
    cvt.rn.satfinite.e4m3x2 converts v twice into one 16-bit register and the low byte is kept. Triton's own
    fp32 -> float8e4nv cast (which feeds that instruction pairs of elements) wrote wrong bytes in this kernel on an
    H100 (Triton 3.6; cause not isolated, see quantize_channelwise); nothing is paired here."""
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    pair = tl.inline_asm_elementwise("{ .reg .b16 t; cvt.rn.satfinite.e4m3x2.f32 t, $1, $1; cvt.u32.u16 $0, t; }",
                                     "=r,f", [v], dtype=tl.uint32, is_pure=True, pack=1)
    return (pair & 0xFF).to(tl.uint8)


@triton.jit
def _pinned(bits):
    """bits through an opaque (side-effecting) register move. Left alone, Triton serves the transposed store by
    recomputing the whole chain from the input in the second layout (the GELU twice: bench/kernel_report.py's
    ex2/val 2.0, and 0.53-0.57 of copy on an H100) instead of moving the finished bytes through shared memory; an
    op it may not duplicate pins the codes, so they are computed once and transposed."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [bits.to(tl.uint32)], dtype=tl.uint32,
                                     is_pure=False, pack=1).to(tl.uint8)


@triton.jit
def _channel_quantize_kernel(x_ptr, h_ptr, inv_ptr, q_ptr, qt_ptr, amax_ptr, sum_ptr, M, K, MP, M_KEY, Q_STRIDE,
                             BM: tl.constexpr, BK: tl.constexpr, ROW_TILES: tl.constexpr, COL_SUM: tl.constexpr,
                             HW_CAST: tl.constexpr, OP: tl.constexpr,
                             NUM_STAGES: tl.constexpr, STORES: tl.constexpr = 3, TILE_STATS: tl.constexpr = False,
                             PIN_CODES: tl.constexpr = False):
    # exploration flags for bench_fp8_quantize (the library never sets them): STORES (bit 0 the codes, bit 1 the
    # transposed codes) drops one store to time the other; TILE_STATS reduces the column stats per tile (the
    # kernel's earlier form) instead of once per strip. PIN_CODES (set by the launcher wherever the kernel is
    # compiled; inline PTX does not interpret) computes the codes once for both stores, see _pinned
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    inv = tl.load(inv_ptr + cols, mask=cols < K, other=1.0)
    # column stats accumulate elementwise over the strip's tiles and reduce across rows once at the end: a
    # cross-warp reduction (shared memory + barrier) per tile would stall the loads behind it
    cmax = tl.zeros([BM, BK], dtype=tl.float32)
    csum = tl.zeros([BM, BK], dtype=tl.float32)
    for i in tl.range(ROW_TILES, num_stages=NUM_STAGES):
        rows = (pid_m * ROW_TILES + i) * BM + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        offs = rows[:, None].to(tl.int64) * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if OP == 1:             # x = fc1's output h: quantize bf16(gelu(h)), the FFN's fc2 input
            x = _gelu_bf16(x)
        elif OP == 2:           # x = d gelu-output: quantize bf16(x * gelu'(h)), the gradient at fc1's output
            x = _round_bf16(x * _gelu_grad(tl.load(h_ptr + offs, mask=inside, other=0.0).to(tl.float32)))
        v = x * inv[None, :]
        bits = _e4m3_bits_cvt(v) if HW_CAST else _e4m3_bits(v, False)
        if PIN_CODES:
            bits = _pinned(bits)
        if STORES & 1:
            tl.store(q_ptr + rows[:, None].to(tl.int64) * Q_STRIDE + cols[None, :], bits, mask=inside)
        if STORES & 2:
            bits_t = tl.trans(bits)
            tl.store(qt_ptr + cols[:, None].to(tl.int64) * MP + rows[None, :], bits_t,
                     mask=(cols[:, None] < K) & (rows[None, :] < MP))
        if TILE_STATS:
            cmax = tl.maximum(cmax, tl.max(tl.abs(x), axis=0)[None, :])
            if COL_SUM:
                csum += tl.where(tl.arange(0, BM)[:, None] == 0, tl.sum(x, axis=0)[None, :], 0.0)
        else:
            cmax = tl.maximum(cmax, tl.abs(x))
            if COL_SUM:
                csum += x
    store_column_stats(amax_ptr, sum_ptr, pid_m, cols, K, tl.max(cmax, axis=0), tl.sum(csum, axis=0), COL_SUM)


# Launch configs the autotuner picks from on CUDA (per token-count bucket, K and op: each op's arithmetic differs).
# NUM_STAGES > 1 prefetches the next row tiles (cp.async into shared memory) while this one is converted and
# stored. Every config compiles for sm_90a without register spills in every op (ptxas -v; tiles of 64 x 128 per
# 4 warps, 128 x 128 or 64 x 256 per 8 warps spill up to 460 bytes per thread in gelu_backward with column sums).
CONFIGS = [dict(BM=bm, BK=bk, NUM_STAGES=st, num_warps=w)
           for bm, bk, w, st in ((32, 128, 4, 1), (64, 128, 8, 1), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3),
                                 (128, 64, 8, 3), (32, 64, 4, 3), (32, 256, 8, 3))]
INTERPRETER_CONFIG = dict(BM=BM, BK=BK, NUM_STAGES=1, num_warps=4)


def _launch_meta(config: dict) -> dict:
    meta = {k: v for k, v in config.items() if k != "num_warps"}      # (STORES too, where a benchmark sets it)
    return dict(meta, ROW_TILES=STRIP // config["BM"])


_channel_quantize_tuned = triton.autotune(
    [triton.Config(_launch_meta(c), num_warps=c["num_warps"]) for c in CONFIGS],
    key=["M_KEY", "K", "OP", "COL_SUM"], do_bench=_quick_bench)(_channel_quantize_kernel)


def quantize_channelwise(t: torch.Tensor, inv: torch.Tensor, amax_bits: torch.Tensor, col_sum: bool = False,
                         hw_cast: bool | None = None, op: str = "identity", h: torch.Tensor | None = None,
                         pad: int = TOKEN_PAD, config: dict | None = None,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """v = op(t) [M, K], inv [K] fp32 encode multipliers -> (q [M, K] e4m3, q^T [K, MP] e4m3) of v, plus v's
    fp32 column sums [K] when col_sum. Max-accumulates v's column amaxes into amax_bits [K] int32 (fp32 bits).
    op: "identity"; "gelu" (v = bf16(gelu_tanh(t))); "gelu_backward" (v = bf16(t * gelu_tanh'(h)), h [M, K]).
    hw_cast: the hardware E4M3 conversion (True: one PTX cvt per value, _e4m3_bits_cvt) or the bit-arithmetic
    rounding (False, e4m3_round); None = the environment's MEGATRON_LONGLIVE_FP8_CHANNEL_HW_CAST (default 1; both
    are bitwise equal to the definition on an H100, tests/gpu/test_fp8_gpu.py, 2026-12-07; the cvt quantizes
    ~25% faster). History: Triton's own fp32 -> float8e4nv cast, exact in fp8_triton's kernels, wrote 25-50%
    wrong bytes here (Triton 3.6) in two forms (cast then transpose the bytes; cast the transposed fp32 tile), so
    the hardware path is the explicit unpaired cvt.
    config: one entry of CONFIGS to launch with, bypassing the autotuner (tests and benchmarks check every config);
    None = the autotuner's pick on CUDA, INTERPRETER_CONFIG under TRITON_INTERPRET.
    out: (q, q^T) to write into instead of new tensors: q may be a column slice of a wider code buffer (unit
    column stride), q^T a row slice of a taller one (contiguous): fp8_shared_input's concatenated dy codes."""
    if op not in OPS:
        raise ValueError(f"quantize_channelwise: unknown op {op!r} (one of {', '.join(OPS)})")
    if (op == "gelu_backward") != (h is not None):
        raise ValueError("quantize_channelwise: h is given exactly when op is gelu_backward")
    t = t.contiguous()
    h = t if h is None else h.contiguous()
    m, k = t.shape
    mp = (m + pad - 1) // pad * pad
    dev = t.device
    if hw_cast is None:
        hw_cast = os.environ.get("MEGATRON_LONGLIVE_FP8_CHANNEL_HW_CAST", "1") == "1"
    hw = bool(hw_cast) and _hw_cast(t)
    strips = triton.cdiv(mp, STRIP)             # programs past M write zero codes (and zero column sums)
    sums = torch.empty(strips if col_sum else 1, k, dtype=torch.float32, device=dev)
    q, q_t = out if out is not None else (torch.empty(m, k, dtype=torch.float8_e4m3fn, device=dev),
                                          torch.empty(k, mp, dtype=torch.float8_e4m3fn, device=dev))
    check_code_buffers(q, q_t, m, k, mp)
    args = (t, h, inv.contiguous(), q.view(torch.uint8), q_t.view(torch.uint8), amax_bits, sums, m, k, mp,
            m.bit_length(), q.stride(0))
    compiled = _hw_cast(t)
    if config is None and compiled:
        # autotuning reruns the kernel on the live buffers: harmless, its atomics and stores are idempotent
        _channel_quantize_tuned[lambda c: (strips, triton.cdiv(k, c["BK"]))](*args, COL_SUM=col_sum, HW_CAST=hw,
                                                                            OP=OPS[op], PIN_CODES=True)
    else:
        config = config or INTERPRETER_CONFIG
        meta = dict(dict(PIN_CODES=compiled), **_launch_meta(config))      # a config may set PIN_CODES (benchmarks)
        _channel_quantize_kernel[(strips, triton.cdiv(k, config["BK"]))](
            *args, COL_SUM=col_sum, HW_CAST=hw, OP=OPS[op], num_warps=config["num_warps"], **meta)
    return (q, q_t, sums.sum(0)) if col_sum else (q, q_t)


def check_code_buffers(q: torch.Tensor, q_t: torch.Tensor, m: int, k: int, mp: int) -> None:
    """The output buffers' layout, as the kernel writes them: q [m, k] with unit column stride, q^T [k, mp]
    contiguous, both E4M3."""
    if q.dtype != torch.float8_e4m3fn or q_t.dtype != torch.float8_e4m3fn:
        raise ValueError(f"quantize_channelwise: out buffers must be float8_e4m3fn, got {q.dtype}, {q_t.dtype}")
    if tuple(q.shape) != (m, k) or q.stride(1) != 1:
        raise ValueError(f"quantize_channelwise: out q must be [{m}, {k}] with unit column stride, got "
                         f"{tuple(q.shape)} strides {q.stride()}")
    if tuple(q_t.shape) != (k, mp) or not q_t.is_contiguous():
        raise ValueError(f"quantize_channelwise: out q^T must be a contiguous [{k}, {mp}], got {tuple(q_t.shape)} "
                         f"strides {q_t.stride()}")


@triton.jit
def _roll_kernel(hist_ptr, pending_ptr, scale_ptr, inv_ptr, C, cursor, gain, LENGTH: tl.constexpr, BC: tl.constexpr):
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    inside = cols < C
    newest = tl.load(pending_ptr + cols, mask=inside, other=0).to(tl.float32, bitcast=True)
    amax = newest
    for r in range(LENGTH):     # the rows this roll keeps; row `cursor` (the oldest) is replaced by `newest`
        old = tl.load(hist_ptr + r * C + cols, mask=inside & (r != cursor), other=0.0)
        amax = tl.maximum(amax, old)
    tl.store(hist_ptr + cursor * C + cols, newest, mask=inside)
    tl.store(pending_ptr + cols, tl.zeros([BC], dtype=tl.int32), mask=inside)
    scale, inv = _scale_and_inverse(amax * gain)
    tl.store(scale_ptr + cols, scale, mask=inside)
    tl.store(inv_ptr + cols, inv, mask=inside)


def roll_history(history: torch.Tensor, pending: torch.Tensor, cursor: int, margin: int):
    """One launch for fp8_channel.roll_history_torch (same contract, bitwise equal): history[cursor] <- pending
    (as fp32), pending <- 0, and the fresh (scale, inverse) [C] of 2**margin * max(history)."""
    length, c = history.shape
    scale = torch.empty(c, dtype=torch.float32, device=history.device)
    inv = torch.empty_like(scale)
    bc = 1024 if _hw_cast(history) else 64
    _roll_kernel[(triton.cdiv(c, bc),)](history, pending, scale, inv, c, cursor, float(2.0 ** margin),
                                        LENGTH=length, BC=bc, num_warps=4)
    return scale, inv
