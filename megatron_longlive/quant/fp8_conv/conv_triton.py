"""Triton implicit-GEMM 3-D convolution on E4M3 operands (fp32 accumulation, bf16/fp32 channels-last output).

A = the padded activation buffer [R, Cp] of reference.py, B = the K-major weights [Cout, taps * Cp]. Output rows
are positions on the padded grid (n, t, hp, wp), t < T - kt + 1: for tap (dt, dh, dw) the A tile is rows
[G + base + dt * Hp * Wp + (dh - kh // 2) * Wp + (dw - kw // 2), + BLOCK_M), i.e. one row offset per tap, so the
K loop (taps x Cp / BLOCK_K steps, flattened into one pipelined loop) is a plain GEMM K loop. Rows that fall on
the spatial border are computed and not stored (0.4% of the rows at 704p full resolution, ~7% at 44x80).

A tile reading columns past Cp (BLOCK_K not dividing Cp) is zero: out-of-bounds fill of the TMA descriptor or
the load mask; the matching B columns (the next tap's weights) therefore contribute exactly 0.
Epilogue: acc * (act_scale * w_scale[n]) + bias[n], stored as [N, T_out, H, W, Cout] (rows of interior
positions only). UP2X (a nearest-2x upsampling before a 1x3x3 conv, as 2x2 phase kernels on the source: see
models/wan/vae_decoder.nearest_up2x_phase_weights): the GEMM's N = 4 phases x Cout, each phase stored at its own
pixel of the [N, T_out, 2H, 2W, Cout] output. fp8 operands go to the tensor cores as
tl.dot(a [BM, BK], b [BN, BK]^T), B K-major as Hopper's FP8 wgmma requires. Under TRITON_INTERPRET the dot runs on fp32 upcasts (exact products, fp32 sums), K_ITERS is a
compile-time constant (the interpreter cannot loop to a runtime bound) and the bf16 store rounds to nearest even.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .quantize_triton import act_scale_from_bits


@triton.jit
def _round_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 (the interpreter's bf16 cast truncates)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def tiles_of_sample(T, H, W, COUT, KT, KH, KW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Output tiles of one sample: M tiles over the padded grid's T_out * Hp * Wp rows, times N tiles."""
    m_rows = (T - KT + 1) * (H + 2 * (KH // 2)) * (W + 2 * (KW // 2))
    return tl.cdiv(m_rows, BLOCK_M) * tl.cdiv(COUT, BLOCK_N)


@triton.jit
def _conv_tile(a_desc, w_desc, a_ptr, w_ptr, a_scale, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT, KT, KH, KW,
               k_iters, pid_m, pid_n, n,
               HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr, UP2X: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile [BLOCK_M rows of sample n, BLOCK_N channels]: the K loop over taps x channel steps, then the
    epilogue. a_desc / w_desc: TMA descriptors (USE_TMA) or None."""
    ph, pw = KH // 2, KW // 2
    hp, wp = H + 2 * ph, W + 2 * pw
    plane = hp * wp
    k_steps = tl.cdiv(CP, BLOCK_K)                            # k_iters = KT * KH * KW * k_steps
    wk = KT * KH * KW * CP                                    # row length of the K-major weights
    t_out = T - KT + 1
    m_rows = t_out * plane                                    # output rows of one sample (padded grid)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    base = G + n * T * plane + m0                             # buffer row of output row m0, tap (kt0, centre)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(k_iters):
        tap = kk // k_steps
        c0 = (kk % k_steps) * BLOCK_K
        dt = tap // (KH * KW)
        dh = (tap // KW) % KH
        dw = tap % KW
        row0 = base + dt * plane + (dh - ph) * wp + (dw - pw)
        if USE_TMA:
            a = a_desc.load([row0, c0])
            b = w_desc.load([n0, tap * CP + c0])
        else:
            rows = row0 + offs_m
            cols = c0 + offs_k
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * CP + cols[None, :],
                        mask=(rows[:, None] < R) & (cols[None, :] < CP), other=0.0)
            b = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * wk + (tap * CP + cols)[None, :],
                        mask=(offs_n[:, None] < COUT) & (cols[None, :] < CP), other=0.0)
        if INTERPRET:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    # epilogue: scales, bias, store the interior rows channels-last
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < COUT, other=0.0)
    y = acc * (a_scale * ws)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < COUT, other=0.0).to(tl.float32)[None, :]
    r = m0 + offs_m
    t = r // plane
    h = (r % plane) // wp - ph
    w = r % wp - pw
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        y = _round_bf16(y)
    if UP2X:
        # GEMM column = (phase, channel), phase (py, px) = output pixel (2i + py, 2j + px), computed at the padded
        # position of source pixel (i + py, j + px) (2x2 kernel: taps at offsets -1, 0); output [.., 2H, 2W, COUT / 4]
        cout = COUT // 4
        phase = offs_n // cout
        py = phase // 2
        px = phase % 2
        hi = h[:, None] - py[None, :]
        wi = w[:, None] - px[None, :]
        valid = ((r < m_rows)[:, None] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                 & (offs_n < COUT)[None, :])
        orow = ((n * t_out + t).to(tl.int64)[:, None] * (2 * H) + 2 * hi + py[None, :]) * (2 * W) + 2 * wi + px[None, :]
        tl.store(out_ptr + orow * cout + (offs_n - phase * cout)[None, :], y.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        valid = (r < m_rows) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        orow = ((n * t_out + t).to(tl.int64) * H + h) * W + w
        tl.store(out_ptr + orow[:, None] * COUT + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < COUT))


@triton.jit
def _conv_body(a_ptr, w_ptr, amax_ptr, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT, KT, KH, KW, k_iters,
               num_tiles, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr, UP2X: tl.constexpr,
               PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """PERSISTENT=False: program (pid, n) computes one tile. PERSISTENT=True: NUM_PROGRAMS programs (one per SM)
    walk the tiles of every sample in steps of NUM_PROGRAMS; the descriptors are made once per program instead of
    once per tile, and the flattened loop lets the compiler overlap a tile's epilogue with the next one's loads."""
    num_n = tl.cdiv(COUT, BLOCK_N)
    tiles_per_sample = tiles_of_sample(T, H, W, COUT, KT, KH, KW, BLOCK_M, BLOCK_N)
    a_desc = None
    w_desc = None
    if USE_TMA:
        wk = KT * KH * KW * CP
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, CP], strides=[CP, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[COUT, wk], strides=[wk, 1], block_shape=[BLOCK_N, BLOCK_K])
    a_scale, _ = act_scale_from_bits(amax_ptr)
    if PERSISTENT:
        # tiles ordered (sample, M tile, N tile): the N tiles of one M tile run side by side (A in L2)
        if INTERPRET:   # the interpreter's loops need Python-int bounds: num_tiles is a constexpr there
            for i in range(tl.cdiv(num_tiles, NUM_PROGRAMS)):
                tile = tl.program_id(0) + i * NUM_PROGRAMS
                if tile < num_tiles:
                    pid = tile % tiles_per_sample
                    _conv_tile(a_desc, w_desc, a_ptr, w_ptr, a_scale, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP,
                               COUT, KT, KH, KW, k_iters, pid // num_n, pid % num_n, tile // tiles_per_sample,
                               HAS_BIAS, USE_TMA, INTERPRET, UP2X, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
                pid = tile % tiles_per_sample
                _conv_tile(a_desc, w_desc, a_ptr, w_ptr, a_scale, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP,
                           COUT, KT, KH, KW, k_iters, pid // num_n, pid % num_n, tile // tiles_per_sample,
                           HAS_BIAS, USE_TMA, INTERPRET, UP2X, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        pid, n = tl.program_id(0), tl.program_id(1)
        _conv_tile(a_desc, w_desc, a_ptr, w_ptr, a_scale, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT,
                   KT, KH, KW, k_iters, pid // num_n, pid % num_n, n, HAS_BIAS, USE_TMA, INTERPRET, UP2X,
                   BLOCK_M, BLOCK_N, BLOCK_K)


# Shape arguments are not specialized (no "== 1" / "% 16" variants): one compile per autotune config serves every
# conv of the decoder. CP and COUT stay specialized (multiples of 16 in every FP8 conv: vectorized loads, stores).
_SHAPE_ARGS = ["R", "G", "T", "H", "W", "KT", "KH", "KW", "M_KEY"]


@triton.jit(do_not_specialize=_SHAPE_ARGS + ["NS"])
def conv_kernel(a_ptr, w_ptr, amax_ptr, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT, KT, KH, KW, M_KEY, NS,
                HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                UP2X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PERSISTENT: tl.constexpr):
    """NS samples; grid (tiles of a sample, NS), or (NUM_PROGRAMS,) when PERSISTENT."""
    _conv_body(a_ptr, w_ptr, amax_ptr, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT, KT, KH, KW,
               KT * KH * KW * tl.cdiv(CP, BLOCK_K), NS * tiles_of_sample(T, H, W, COUT, KT, KH, KW, BLOCK_M, BLOCK_N),
               HAS_BIAS, USE_TMA, INTERPRET, UP2X, PERSISTENT, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def conv_kernel_static(a_ptr, w_ptr, amax_ptr, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT, KT, KH, KW,
                       K_ITERS: tl.constexpr, NUM_TILES: tl.constexpr,
                       HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr, UP2X: tl.constexpr,
                       PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same with compile-time loop lengths (TRITON_INTERPRET cannot loop to a runtime bound)."""
    _conv_body(a_ptr, w_ptr, amax_ptr, ws_ptr, bias_ptr, out_ptr, R, G, T, H, W, CP, COUT, KT, KH, KW, K_ITERS,
               NUM_TILES, HAS_BIAS, USE_TMA, INTERPRET, UP2X, PERSISTENT, NUM_PROGRAMS,
               BLOCK_M, BLOCK_N, BLOCK_K)


CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): sm90 FP8 wgmma tiles
    (128, 128, 64, 4, 4), (128, 128, 128, 3, 4), (128, 128, 128, 4, 8),
    (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 256, 128, 3, 8),
    # narrow channels (Wan2.1's 96 / 192 at full / half resolution): 96 fills 56% of a 128x64 (N x K) tile but
    # 75% of 64x32 and 128x32; 192 fills 64x64 exactly
    (128, 64, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4),
]
# One program per SM walking the tiles (descriptors made once per program, epilogue overlapped with the next
# tile's loads): the wide tiles of the compute-bound convs, plus a 4-stage 128x256x128 (192 KiB of the 227 KiB of
# shared memory). Autotuned against CONFIGS when enabled (ops.persistent_mode).
PERSISTENT_CONFIGS = [
    (128, 256, 64, 4, 8), (128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 256, 128, 4, 8),
]
INTERPRET_TILE = (32, 16, 32)  # small tiles keep the interpreter fast and exercise partial tiles
