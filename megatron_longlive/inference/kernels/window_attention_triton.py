"""Flash-attention forward over the streaming KV window (issue 9): one Triton kernel, three ways to read K/V.

Inference only, no mask inside the window: every query attends every key of every valid region (a region is one
chunk of `tokens_per_chunk` keys; `valid[r] == 0` marks an empty region whose keys are never attended).

    q      [B, Sq, H, D]            out [B, Sq, H, D] (out_dtype)
    MODE "bf16"   k, v [B, Skv, H, D] any float dtype, fed to the tensor cores as bf16; P as bf16.
    MODE "fp8"    q8, k8, v8 float8_e4m3fn from `quantize_fp8` below, with fp32 scales
                    q_scale [B, Sq, H]  (per token and head)  - a row factor of the scores
                    k_scale [B, Skv, H] (per token and head)  - a column factor of the scores
                    v_scale [B, H, D]   (per head and channel, over the window) - a column factor of P @ V
                  QK^T and PV are FP8 tensor-core dots with fp32 accumulation; P in [0, 1] is multiplied by
                  P_SCALE = 256 (a power of two: 1 -> 256 < 448, and probabilities down to 2**-17 stay
                  representable as E4M3 subnormals) before its E4M3 cast and divided out at the end.
                  v8 is stored transposed ([B, H, D, Skv] memory, handed over as a [B, Skv, H, D] view) so
                  the PV operand is K-major, the layout Hopper's 8-bit wgmma wants, without an in-kernel transpose.
    MODE "nvfp4"  k, v = packed NVFP4 cache pages (quant/nvfp4/kv_cache.py): codes uint8 [B, Skv, H, D/2]
                  (element 2i in the low nibble), E4M3 block scales [B, Skv, H, D/16], fp32 region scales
                  [R]. A tile is decoded to `e2m1 * block_scale` (exact in bf16: 2-bit x 4-bit significands)
                  with a few integer ops (E2M1 -> fp32 bits, no table); the region scale multiplies the
                  scores (K) and the probabilities (V) in fp32; one bf16 P @ V dot.

Scores use exp2 with log2(e) / sqrt(D) folded into the score scale; fp32 online softmax. On a GPU the key loop
runs to the runtime Skv (one compile serves every window length; autotuning is keyed on the shapes); under
TRITON_INTERPRET `window_attention_kernel_static` takes Skv as a constexpr (the interpreter cannot loop to a runtime
bound); both kernels run the same `_program`. With `skip_invalid` (some region empty) a tile whose keys are all
invalid is skipped; without it (the steady state) the loop body has no data-dependent branch, so Triton
pipelines the K/V loads. Grid: (cdiv(Sq, BLOCK_M), B * H).

TRITON_INTERPRET=1 (CPU tests; constexpr INTERPRET): the interpreter's fp32 -> E4M3 cast rounds wrongly across
binades (7.83 -> 4.0), so P is rounded to E4M3 exactly first (`e4m3_round`, the NVFP4 kernels' helper) and then
cast (exact); its fp32 -> bf16 cast truncates (rounded the same way) and its bf16 dot returns garbage, so bf16 operands (exact values) are multiplied as fp32. On a GPU the
hardware cvt.rn rounds the same way and the dots run on bf16 / E4M3 tensor cores.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...quant.nvfp4.kernels.triton_common import e4m3_round
from .fp8_window_quant_triton import e4m3_scale

MODES = {"bf16": 0, "fp8": 1, "nvfp4": 2}
P_SCALE = 256.0
LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA): the autotune space on CUDA, kept small (keyed on the shapes) so a
# first call tunes in seconds. TMA configs load K/V tiles through tensor descriptors (bf16 / fp8 modes, where the
# strides allow it; nvfp4 tunes the 3 pointer configs). Chosen from ptxas -v of the sm90 builds (D 128): with
# pointer loads, BLOCK_M 128 at 4 warps spills ~1 KB per thread and BLOCK_M 64 at 4 warps spills 24-64 B (the
# [BLOCK_N, D] pointer tiles take the registers), so pointer configs use 8 warps; the TMA builds hold 190-240
# registers without spills. BLOCK_M 256 would need a 256 x 128 fp32 accumulator: left out.
CONFIGS = [(128, 64, 8, 2, False), (128, 64, 8, 3, False), (128, 128, 8, 2, False),
           (128, 64, 8, 3, True), (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 4, 3, True)]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _decode_nvfp4(codes_ptr, scales_ptr, offs_n, stride_cn, stride_sn, ok, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Packed NVFP4 tile -> `e2m1 * block_scale` [BLOCK_N, D] bf16 (exact)."""
    half = tl.arange(0, D // 2)
    byte = tl.load(codes_ptr + offs_n[:, None] * stride_cn + half[None, :], mask=ok[:, None], other=0).to(tl.int32)
    code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, D))        # element 2i = low nibble
    mag = code & 7
    # E2M1 magnitude m = (e, mantissa bit): value 2**(e-1) * (1 + mbit/2) for m >= 2, 0.5 for m = 1, 0 for m = 0
    bits = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)
    bits = tl.where(mag >= 2, bits, tl.where(mag == 1, 126 << 23, 0)) | ((code & 8) << 28)
    value = bits.to(tl.float32, bitcast=True)
    nb = tl.arange(0, D // 16)
    sc = tl.load(scales_ptr + offs_n[:, None] * stride_sn + nb[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, D // 16, 16)), (BLOCK_N, D))
    return (value * sc).to(tl.bfloat16)


@triton.jit
def _bf16(x, INTERPRET: tl.constexpr):
    """fp32 -> bf16, nearest even (the interpreter's cast truncates: round the bits first, then cast exactly)."""
    if INTERPRET:
        b = x.to(tl.float32).to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        x = b.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _mm(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for bf16 operands; under the interpreter (whose bf16 dot is broken) the exact fp32 dot."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_k(k_base, k_desc, start, offs_n, offs_d, sks, ok, USE_TMA: tl.constexpr):
    """K tile [BLOCK_N, D]: a TMA descriptor load (rows past Skv read as 0) or masked pointer loads."""
    if USE_TMA:
        return k_desc.load([start, 0])
    return tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _load_v(v_base, v_desc, start, offs_n, offs_d, svs, svd, ok, USE_TMA: tl.constexpr, V_T: tl.constexpr,
            SKIP_INVALID: tl.constexpr):
    """V tile [BLOCK_N, D]; V_T: V^T memory ([D, Skv] per head: the descriptor reads [D, BLOCK_N], transposed
    here). A TMA tile of an empty region may hold stale values: zeroed, so that 0 * garbage stays out of P @ V."""
    if USE_TMA:
        if V_T:
            v = tl.trans(v_desc.load([0, start]))
        else:
            v = v_desc.load([start, 0])
        if SKIP_INVALID:
            v = tl.where(ok[:, None], v, tl.zeros_like(v))
        return v
    return tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=ok[:, None], other=0.0)


@triton.jit
def _tile(q, m_i, l_i, acc, start, row_scale, k_base, ks_base, kts_ptr, v_base, vs_base, vts_ptr, valid_ptr,
          tokens_per_chunk, sks, skss, svs, svd, svss,
          D: tl.constexpr, MODE: tl.constexpr, P_SCALE: tl.constexpr,
          INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, ok, k_desc, v_desc, USE_TMA: tl.constexpr,
          SKIP_INVALID: tl.constexpr):
    """One key tile of the online softmax: returns the updated (m_i, l_i, acc)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    # 1. scores [BLOCK_M, BLOCK_N] in log2 units
    if MODE == 2:
        region = offs_n // tokens_per_chunk
        k = _decode_nvfp4(k_base, ks_base, offs_n, sks, skss, ok, BLOCK_N, D)
        s = _mm(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), INTERPRET)
        col = tl.load(kts_ptr + region, mask=ok, other=0.0)
    elif MODE == 1:
        k = _load_k(k_base, k_desc, start, offs_n, offs_d, sks, ok, USE_TMA)
        s = tl.dot(q, tl.trans(k))
        col = tl.load(ks_base + offs_n * skss, mask=ok, other=0.0)
    else:
        k = _load_k(k_base, k_desc, start, offs_n, offs_d, sks, ok, USE_TMA)
        s = _mm(q, tl.trans(_bf16(k, INTERPRET)), tl.zeros((q.shape[0], BLOCK_N), tl.float32), INTERPRET)
    if MODE == 0:
        s = s * row_scale[:, None]
    else:
        s = s * row_scale[:, None] * col[None, :]
    s = tl.where(ok[None, :], s, float("-inf"))
    # 2. online softmax (a row with no valid key so far keeps m = -inf: subtract 0 instead, p = 0)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    # 3. P @ V
    if MODE == 2:
        v = _decode_nvfp4(v_base, vs_base, offs_n, svs, svss, ok, BLOCK_N, D)
        pv = p * tl.load(vts_ptr + region, mask=ok, other=0.0)[None, :]
        acc = _mm(_bf16(pv, INTERPRET), v, acc, INTERPRET)
    elif MODE == 1:
        v = _load_v(v_base, v_desc, start, offs_n, offs_d, svs, svd, ok, USE_TMA, True, SKIP_INVALID)
        ps = p * P_SCALE
        if INTERPRET:
            ps, _ = e4m3_round(ps)
        acc = tl.dot(ps.to(tl.float8e4nv), v, acc)
    else:
        v = _load_v(v_base, v_desc, start, offs_n, offs_d, svs, svd, ok, USE_TMA, False, SKIP_INVALID)
        acc = _mm(_bf16(p, INTERPRET), _bf16(v, INTERPRET), acc, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def _program(q_ptr, qs_ptr, k_ptr, ks_ptr, kts_ptr, v_ptr, vs_ptr, vts_ptr, valid_ptr, out_ptr,
             Sq, kv_end, H, tokens_per_chunk, qk_scale,
             sqb, sqs, sqh, skb, sks, skh, sksb, skss, sksh, svb, svs, svh, svd, svsb, svss, svsh, sob, sos, soh,
             D: tl.constexpr, MODE: tl.constexpr, SKIP_INVALID: tl.constexpr, P_SCALE: tl.constexpr,
             INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """One (BLOCK_M queries, batch x head) program; kv_end = Skv (runtime on a GPU, a constexpr when interpreted)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < Sq
    # the Q tile, loaded once; the score scale log2(e)/sqrt(D) (x q_scale per row in fp8 mode)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=m_mask[:, None], other=0.0)
    if MODE == 1:
        row_scale = tl.load(qs_ptr + (b * Sq + offs_m) * H + h, mask=m_mask, other=0.0) * qk_scale
    else:
        q = _bf16(q, INTERPRET)
        row_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * qk_scale
    k_base = k_ptr + b * skb + h * skh
    ks_base = ks_ptr + b * sksb + h * sksh
    v_base = v_ptr + b * svb + h * svh
    vs_base = vs_ptr + b * svsb + h * svsh
    k_desc = k_base                               # (unused without TMA)
    v_desc = v_base
    if USE_TMA:                                   # bf16 / fp8: 2-D descriptors over this (batch, head)'s K and V
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_end, D], strides=[sks, 1], block_shape=[BLOCK_N, D])
        if MODE == 1:                             # V^T memory [D, Skv]
            v_desc = tl.make_tensor_descriptor(v_base, shape=[D, kv_end], strides=[svd, 1], block_shape=[D, BLOCK_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_end, D], strides=[svs, 1], block_shape=[BLOCK_N, D])
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = offs_n < kv_end
        if SKIP_INVALID:
            ok = ok & (tl.load(valid_ptr + offs_n // tokens_per_chunk, mask=ok, other=0) != 0)
            if tl.max(ok.to(tl.int32), axis=0) > 0:
                m_i, l_i, acc = _tile(q, m_i, l_i, acc, start, row_scale, k_base, ks_base, kts_ptr, v_base, vs_base,
                                      vts_ptr, valid_ptr, tokens_per_chunk, sks, skss, svs, svd, svss,
                                      D, MODE, P_SCALE, INTERPRET, BLOCK_N, ok, k_desc, v_desc, USE_TMA,
                                      SKIP_INVALID)
        else:
            m_i, l_i, acc = _tile(q, m_i, l_i, acc, start, row_scale, k_base, ks_base, kts_ptr, v_base, vs_base,
                                  vts_ptr, valid_ptr, tokens_per_chunk, sks, skss, svs, svd, svss,
                                  D, MODE, P_SCALE, INTERPRET, BLOCK_N, ok, k_desc, v_desc, USE_TMA,
                                  SKIP_INVALID)
    if MODE == 1:
        vsc = tl.load(vs_ptr + (b * H + h) * D + offs_d)                  # [D] per-channel V scale
        out = acc * (vsc / P_SCALE)[None, :] / l_i[:, None]
    else:
        out = acc / l_i[:, None]
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit(do_not_specialize=["Sq", "Skv", "tokens_per_chunk"])   # lengths only bound masks: one compile for all
def window_attention_kernel(
        q_ptr, qs_ptr, k_ptr, ks_ptr, kts_ptr, v_ptr, vs_ptr, vts_ptr, valid_ptr, out_ptr,
        Sq, Skv, H, tokens_per_chunk, qk_scale,
        sqb, sqs, sqh, skb, sks, skh, sksb, skss, sksh, svb, svs, svh, svd, svsb, svss, svsh, sob, sos, soh,
        D: tl.constexpr, MODE: tl.constexpr, SKIP_INVALID: tl.constexpr, P_SCALE: tl.constexpr,
        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    _program(q_ptr, qs_ptr, k_ptr, ks_ptr, kts_ptr, v_ptr, vs_ptr, vts_ptr, valid_ptr, out_ptr,
             Sq, Skv, H, tokens_per_chunk, qk_scale,
             sqb, sqs, sqh, skb, sks, skh, sksb, skss, sksh, svb, svs, svh, svd, svsb, svss, svsh, sob, sos, soh,
             D, MODE, SKIP_INVALID, P_SCALE, INTERPRET, BLOCK_M, BLOCK_N, USE_TMA)


@triton.jit
def window_attention_kernel_static(
        q_ptr, qs_ptr, k_ptr, ks_ptr, kts_ptr, v_ptr, vs_ptr, vts_ptr, valid_ptr, out_ptr,
        Sq, SKV: tl.constexpr, H, tokens_per_chunk, qk_scale,
        sqb, sqs, sqh, skb, sks, skh, sksb, skss, sksh, svb, svs, svh, svd, svsb, svss, svsh, sob, sos, soh,
        D: tl.constexpr, MODE: tl.constexpr, SKIP_INVALID: tl.constexpr, P_SCALE: tl.constexpr,
        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """The same with a compile-time key count: TRITON_INTERPRET cannot loop to a runtime bound."""
    _program(q_ptr, qs_ptr, k_ptr, ks_ptr, kts_ptr, v_ptr, vs_ptr, vts_ptr, valid_ptr, out_ptr,
             Sq, SKV, H, tokens_per_chunk, qk_scale,
             sqb, sqs, sqh, skb, sks, skh, sksb, skss, sksh, svb, svs, svh, svd, svsb, svss, svsh, sob, sos, soh,
             D, MODE, SKIP_INVALID, P_SCALE, INTERPRET, BLOCK_M, BLOCK_N, USE_TMA)


_KEY = ["Skv", "D", "MODE", "SKIP_INVALID", "Sq", "H"]
_autotuned = None          # the last autotuner used (bench_kv_attention prints its best_config)
_AUTOTUNERS: dict = {}


def _tuned_kernel(with_tma: bool):
    """The kernel under @triton.autotune over CONFIGS (CUDA only: the interpreter runs one fixed tile); without
    TMA configs when the tensors cannot be read through descriptors."""
    global _autotuned
    if with_tma not in _AUTOTUNERS:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "USE_TMA": t}, num_warps=w, num_stages=s)
                   for m, n, w, s, t in CONFIGS if with_tma or not t]
        _AUTOTUNERS[with_tma] = triton.autotune(configs, key=_KEY)(window_attention_kernel)
    _autotuned = _AUTOTUNERS[with_tma]
    return _autotuned


def _tma_ok(k: torch.Tensor, v: torch.Tensor, mode: str) -> bool:
    """Whether K/V tiles can be TMA loads: 16-byte aligned bases and per-(batch, head) row strides, unit last stride
    (V^T memory in fp8 mode: unit token stride)."""
    if mode == "nvfp4":
        return False
    kb, vb = k.element_size(), v.element_size()
    v_strides = (v.stride(0), v.stride(2), v.stride(3)) if mode == "fp8" else (v.stride(0), v.stride(1), v.stride(2))
    unit = v.stride(1) == 1 if mode == "fp8" else v.stride(3) == 1
    return (unit and k.stride(3) == 1 and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0
            and all(x * kb % 16 == 0 for x in k.stride()[:3]) and all(x * vb % 16 == 0 for x in v_strides))


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need a scratch allocation per launch: torch's caching allocator (stream
    ordered, and the CUDA-graph pool during a capture)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


_PLACEHOLDERS: dict = {}


def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [1], int32 [1] ones) for pointer arguments a mode does not read: made once per device, so a call
    allocates nothing but its output (cheap eager calls; nothing new inside a CUDA-graph capture)."""
    key = str(device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = (torch.zeros(1, dtype=torch.float32, device=device),
                              torch.ones(1, dtype=torch.int32, device=device))
    return _PLACEHOLDERS[key]


def _check_runs_here(x: torch.Tensor) -> None:
    if not x.is_cuda and not _interpret():
        raise RuntimeError("window attention runs a Triton kernel: it needs CUDA, or TRITON_INTERPRET=1 set before "
                           "triton is imported (CPU tests). On CPU use infer.attention=sdpa")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_chunk: int,
                     valid: torch.Tensor | None = None, *, mode: str = "bf16", skip_invalid: bool | None = None,
                     q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, k_ts: torch.Tensor | None = None,
                     v_ts: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                     block_m: int | None = None, block_n: int | None = None, tma: bool | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the window (see module docstring) -> [B, Sq, H, D] in out_dtype.

    mode "bf16": k, v [B, Skv, H, D]; "fp8": q, k, v, q_scale, k_scale, v_scale from `quantize_fp8`;
    "nvfp4": k, v = codes [B, Skv, H, D/2], k_scale, v_scale = E4M3 block scales [B, Skv, H, D/16], k_ts, v_ts =
    region scales [R]. valid [R] (None = all valid); skip_invalid (default: valid is given) compiles the
    variant that masks empty regions and skips their tiles; skip_invalid=False promises every region is valid
    (valid is then not read: the steady-state variant without the check). block_m/block_n pin a tile and tma
    (True/False) pins the load path (default: both autotuned on CUDA; TMA only where `_tma_ok`)."""
    _check_runs_here(q)
    bsz, sq, h, d = q.shape
    skv = k.shape[1]
    if mode not in MODES:
        raise ValueError(f"window_attention mode={mode!r}: choose one of {sorted(MODES)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"window_attention: head_dim {d} must be a power of two >= 16")
    kd = d // 2 if mode == "nvfp4" else d
    if k.shape != (bsz, skv, h, kd) or v.shape != k.shape:
        raise ValueError(f"K/V must be [B, Skv, H, {kd}] = {(bsz, skv, h, kd)}, got {tuple(k.shape)} / {tuple(v.shape)}")
    regions = triton.cdiv(skv, tokens_per_chunk)
    if skip_invalid is None:
        skip_invalid = valid is not None
    dummy, ones = _placeholders(q.device)
    if not skip_invalid:
        valid = ones                              # not read: only the skip_invalid variant reads valid
    elif valid is None:
        valid = torch.ones(regions, dtype=torch.int32, device=q.device)
    else:
        if valid.numel() < regions:
            raise ValueError(f"valid has {valid.numel()} flags for {regions} regions of {tokens_per_chunk} keys")
        valid = valid.to(torch.int32)
    if mode == "fp8":
        assert q.dtype == k.dtype == v.dtype == torch.float8_e4m3fn, "fp8 mode: q, k, v from quantize_fp8"
        qs, ks, vs, kts, vts = q_scale, k_scale, v_scale, dummy, dummy
        assert qs.is_contiguous() and vs.is_contiguous() and qs.shape == (bsz, sq, h) and vs.shape == (bsz, h, d)
        ks_strides = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2))
        vs_strides = (0, 0, 0)
        out_dtype = out_dtype or torch.bfloat16
    elif mode == "nvfp4":
        if k_ts.numel() < regions or v_ts.numel() < regions:
            raise ValueError(f"need {regions} region scales for {skv} keys of {tokens_per_chunk} per region")
        qs, kts, vts = dummy, k_ts.float().contiguous(), v_ts.float().contiguous()
        ks, vs = (x.view(torch.float8_e4m3fn) if x.dtype == torch.uint8 else x for x in (k_scale, v_scale))
        assert ks.dtype == vs.dtype == torch.float8_e4m3fn, "nvfp4 block scales: float8_e4m3fn (or its uint8 bits)"
        assert ks.stride(-1) == 1 and vs.stride(-1) == 1, "block scales need a contiguous last dim"
        ks_strides = (ks.stride(0), ks.stride(1), ks.stride(2))
        vs_strides = (vs.stride(0), vs.stride(1), vs.stride(2))
        out_dtype = out_dtype or q.dtype
    else:
        qs = ks = vs = kts = vts = dummy
        ks_strides = vs_strides = (0, 0, 0)
        out_dtype = out_dtype or q.dtype
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k.stride(-1) == 1, "K needs a contiguous last dim"
    out = torch.empty(bsz, sq, h, d, dtype=out_dtype, device=q.device)
    args = (q, qs, k, ks, kts, v, vs, vts, valid, out, sq, skv, h, tokens_per_chunk, d ** -0.5 * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *ks_strides,
            v.stride(0), v.stride(1), v.stride(2), v.stride(3), *vs_strides, out.stride(0), out.stride(1), out.stride(2))
    meta = dict(D=d, MODE=MODES[mode], SKIP_INVALID=bool(skip_invalid), P_SCALE=P_SCALE,
                INTERPRET=_interpret())
    tma_ok = _tma_ok(k, v, mode)
    if tma and not tma_ok:
        raise ValueError(f"window_attention tma=True: K/V strides {k.stride()} / {v.stride()} cannot be TMA tiles")
    if q.is_cuda and tma is not False and tma_ok:
        _ensure_allocator()
    if block_m or block_n or tma is not None or not q.is_cuda:
        bm, bn = block_m or (32 if not q.is_cuda else 128), block_n or (32 if not q.is_cuda else 64)
        kernel = window_attention_kernel_static if _interpret() else window_attention_kernel
        kernel[(triton.cdiv(sq, bm), bsz * h)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=bool(tma), num_warps=8 if bm >= 128 else 4, num_stages=2)
    else:
        _tuned_kernel(tma_ok)[lambda c: (triton.cdiv(sq, c["BLOCK_M"]), bsz * h)](*args, **meta)
    return out


def _window_stats(k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, smooth_k: bool):
    """(K smoothing vector [B, H, D] fp32 or None, V channel amax [B, H, D] fp32) over the window; empty-region keys
    (key_valid False) count as zeros, so stale or non-finite values there never reach the statistics."""
    if key_valid is not None:
        k, v = (torch.where(key_valid[None, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
                for x in (k, v))
    mean = k.mean(1, dtype=torch.float32) if smooth_k else None
    return mean, torch.linalg.vector_norm(v, float("inf"), dim=1).float()


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None,
                 smooth_k: bool = True):
    """q [B, Sq, H, D], k, v [B, Skv, H, D] -> (q8, q_scale, k8, k_scale, v8, v_scale) for mode "fp8": the fused
    Triton quantizer (fp8_window_quant_triton.py) on CUDA / under TRITON_INTERPRET, else `quantize_fp8_torch`
    (bitwise the same). key_valid [Skv] bool: keys of empty regions (left out of the window statistics)."""
    if not (q.is_cuda or _interpret()):
        return quantize_fp8_torch(q, k, v, key_valid, smooth_k)
    from .fp8_window_quant_triton import quantize_rows, quantize_v

    mean, amax = _window_stats(k, v, key_valid, smooth_k)
    q8, qs = quantize_rows(q, _interpret())
    k8, ks = quantize_rows(k, _interpret(), mean)
    v8, vs = quantize_v(v, _interpret(), amax)
    return q8, qs, k8, ks, v8, vs


def quantize_fp8_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None,
                       smooth_k: bool = True):
    """BF16/fp32 q [B, Sq, H, D], k, v [B, Skv, H, D] -> (q8, q_scale, k8, k_scale, v8, v_scale) for mode "fp8".

    q, k: one scale per (token, head) = its max |x| / 448 (a row / column factor of the scores, so the QK^T dot
    runs on the E4M3 values). smooth_k: K minus its mean over the window per (batch, head, channel) first
    (SageAttention's K smoothing): q . (k - m) = q . k - q . m shifts every score of a query by the same amount,
    which softmax ignores, while a channel-wise offset common to all keys no longer takes E4M3 range.
    v: one scale per (head, channel) over the whole window, the finest scale that factors
    out of P @ V without touching P (a per-token V scale would have to multiply P before its E4M3 cast); it follows
    outlier channels, and E4M3 is relative precision, so smaller tokens of a channel lose nothing until 2**-6 of
    its amax (then subnormals). Costs one extra read of V (the amax) and of K (the mean). v8 is returned as a
    [B, Skv, H, D] view of [B, H, D, Skv] memory (module docstring).
    Plain torch, the reference of the fused Triton quantizer (several passes per tensor: CPU and tests);
    an all-zero row gets scale 1."""

    def rows(x):
        s = x.abs().amax(-1, keepdim=True).float()                            # [B, S, H, 1]
        s = e4m3_scale(s)
        return (x.float() / s).to(torch.float8_e4m3fn), s[..., 0]

    mean, vs = _window_stats(k, v, key_valid, smooth_k)
    q8, qs = rows(q)
    k8, ks = rows(k.float() - mean[:, None] if smooth_k else k)
    vs = e4m3_scale(vs)                                                        # [B, H, D]
    v8 = (v.float().permute(0, 2, 3, 1) / vs[..., None]).to(torch.float8_e4m3fn).contiguous()  # [B, H, D, Skv]
    return q8, qs, k8, ks, v8.permute(0, 3, 1, 2), vs
