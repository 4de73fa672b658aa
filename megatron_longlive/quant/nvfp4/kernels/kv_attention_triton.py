"""Fused NVFP4-KV flash attention (forward): K/V are read as packed E2M1 codes + E4M3 block scales and
dequantized inside the attention loop, so no BF16/FP32 copy of the cached window is ever materialised.

Layout (one layer of `quant/nvfp4/kv_cache.NVFP4KVCache`):
    q            [B, Sq, H, D]   bf16 / fp16 / fp32 (any strides)
    k_codes      [B, Skv, H, D/2] uint8, two E2M1 codes per byte, element 2i in the low nibble
    k_scales     [B, Skv, H, D/16] E4M3 bits (uint8 view of float8_e4m3fn), 1x16 blocks along D
    k_ts         [R] fp32, one decode scale per region (chunk) of `tokens_per_chunk` keys
    (v_* the same), valid [R] int32 (0 = empty region: its keys are skipped)
    out          [B, Sq, H, D]   fp32

Dequantized key = (e2m1 * block_scale) * ts. The first product is exact and fits bf16 (2-bit by 4-bit
significands), so the kernel feeds `e2m1 * block_scale` to the tensor cores exactly and applies the
per-region scale `ts` to the scores (K) and to the probabilities (V) in fp32. Online softmax in fp32.
The loop over key blocks has a compile-time trip count (one compile per window length; a stream has at
most `regions` of them). The probabilities P (fp32) are split P = P_hi + P_lo into two bf16 parts (SPLIT_P, default), which
makes P @ V accurate to ~2**-16; SPLIT_P=False is the usual one-bf16-pass flash attention (faster, ~2**-9).
An fp32 query is split the same way (q_hi + q_lo), so the scores are accurate to ~2**-16 as well.
With MMA_BF16=False every dot is fp32 (the CPU interpreter path; slow on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import e2m1_decode, e4m3_decode


@triton.jit
def _dequant_tile(codes_ptr, scales_ptr, offs_n, offs_d, stride_cn, stride_sn, n_mask, D: tl.constexpr):
    """Keys/values of tokens offs_n as `e2m1 * block_scale` (exact fp32; the region scale is applied later)."""
    byte = tl.load(codes_ptr + offs_n[:, None] * stride_cn + (offs_d[None, :] // 2),
                   mask=n_mask[:, None], other=0).to(tl.int32)
    code = tl.where((offs_d[None, :] % 2) == 0, byte & 0xF, (byte >> 4) & 0xF)
    sbits = tl.load(scales_ptr + offs_n[:, None] * stride_sn + (offs_d[None, :] // 16),
                    mask=n_mask[:, None], other=0).to(tl.int32)
    return e2m1_decode(code) * e4m3_decode(sbits)                       # [BLOCK_N, D]


@triton.jit
def nvfp4_kv_attention_kernel(
        q_ptr, kc_ptr, ks_ptr, kts_ptr, vc_ptr, vs_ptr, vts_ptr, valid_ptr, out_ptr,
        Sq, Skv, H, tokens_per_chunk, sm_scale,
        sqb, sqs, sqh, skcb, skcs, skch, sksb, skss, sksh, svcb, svcs, svch, svsb, svss, svsh,
        sob, sos, soh,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_P: tl.constexpr,
        Q_FP32: tl.constexpr, KV_BLOCKS: tl.constexpr, MMA_BF16: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < Sq
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=m_mask[:, None], other=0.0).to(tl.float32)
    if MMA_BF16:
        q_hi = q.to(tl.bfloat16)
        q_lo = (q - q_hi.to(tl.float32)).to(tl.bfloat16)
    kc = kc_ptr + b * skcb + h * skch
    ks = ks_ptr + b * sksb + h * sksh
    vc = vc_ptr + b * svcb + h * svch
    vs = vs_ptr + b * svsb + h * svsh
    qk_scale = sm_scale * 1.4426950408889634                              # exp(x) = exp2(x * log2 e)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for j in range(KV_BLOCKS):           # static trip count (a runtime bound breaks TRITON_INTERPRET on numpy 2)
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        region = offs_n // tokens_per_chunk
        in_range = offs_n < Skv
        ok = tl.load(valid_ptr + region, mask=in_range, other=0) != 0
        if tl.max(ok.to(tl.int32), axis=0) > 0:                            # skip blocks of empty regions
            k = _dequant_tile(kc, ks, offs_n, offs_d, skcs, skss, ok, D)
            if MMA_BF16:
                kb = k.to(tl.bfloat16)                                                      # exact
                s = tl.dot(q_hi, tl.trans(kb))
                if Q_FP32:
                    s += tl.dot(q_lo, tl.trans(kb))
            else:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            kts = tl.load(kts_ptr + region, mask=ok, other=0.0)
            s = s * (kts * qk_scale)[None, :]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            v = _dequant_tile(vc, vs, offs_n, offs_d, svcs, svss, ok, D)
            pv = p * tl.load(vts_ptr + region, mask=ok, other=0.0)[None, :]
            if MMA_BF16:
                vb = v.to(tl.bfloat16)                                                      # exact
                pv_hi = pv.to(tl.bfloat16)
                acc += tl.dot(pv_hi, vb)
                if SPLIT_P:
                    acc += tl.dot((pv - pv_hi.to(tl.float32)).to(tl.bfloat16), vb)
            else:
                acc += tl.dot(pv, v, input_precision="ieee")
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out, mask=m_mask[:, None])


def nvfp4_kv_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, k_ts: torch.Tensor,
                       v_codes: torch.Tensor, v_scales: torch.Tensor, v_ts: torch.Tensor,
                       tokens_per_chunk: int, valid: torch.Tensor | None = None, *, split_p: bool = True,
                       block_m: int | None = None, block_n: int | None = None,
                       mma_bf16: bool | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over packed NVFP4 keys/values (see module docstring) -> [B, Sq, H, D] fp32.

    k_codes/v_codes [B, Skv, H, D/2] uint8; *_scales [B, Skv, H, D/16] float8_e4m3fn or uint8; *_ts [R]
    fp32 with R * tokens_per_chunk >= Skv; valid [R] (bool/int; None = all valid). A query whose keys are all
    invalid gets NaN (as SDPA with an all-False mask row). mma_bf16 (default: on CUDA) feeds the tensor
    cores bf16 as described above; off, the dots are fp32 (`ieee`): the path TRITON_INTERPRET runs, whose
    numpy emulation of bf16 casts and bf16 dots is not faithful."""
    bsz, sq, h, d = q.shape
    skv = k_codes.shape[1]
    if d % 16 or d < 16 or d & (d - 1):
        raise ValueError(f"nvfp4_kv_attention: head_dim {d} must be a power of two >= 16 (1x16 blocks)")
    if k_codes.shape != (bsz, skv, h, d // 2) or v_codes.shape != k_codes.shape:
        raise ValueError(f"packed K/V must be [B, Skv, H, D/2] = {(bsz, skv, h, d // 2)}, got "
                         f"{tuple(k_codes.shape)} / {tuple(v_codes.shape)}")
    regions = triton.cdiv(skv, tokens_per_chunk)
    if k_ts.numel() < regions or v_ts.numel() < regions:
        raise ValueError(f"need {regions} region scales for {skv} keys of {tokens_per_chunk} per region")
    if valid is None:
        valid = torch.ones(regions, dtype=torch.int32, device=q.device)
    valid = valid.to(torch.int32).contiguous()
    for t in (k_codes, k_scales, v_codes, v_scales):
        if t.stride(-1) != 1:
            raise ValueError("packed K/V and scales need a contiguous last dim")
    ks, vs = (s.view(torch.uint8) if s.dtype != torch.uint8 else s for s in (k_scales, v_scales))
    out = torch.empty(bsz, sq, h, d, dtype=torch.float32, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    bm = block_m or (64 if d <= 64 else 128)
    bn = block_n or 64
    grid = (triton.cdiv(sq, bm), bsz * h)
    nvfp4_kv_attention_kernel[grid](
        q, k_codes, ks, k_ts.float().contiguous(), v_codes, vs, v_ts.float().contiguous(), valid, out,
        sq, skv, h, tokens_per_chunk, d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_M=bm, BLOCK_N=bn, SPLIT_P=split_p, Q_FP32=q.dtype == torch.float32,
        KV_BLOCKS=triton.cdiv(skv, bn), MMA_BF16=q.is_cuda if mma_bf16 is None else mma_bf16,
        num_warps=8 if bm >= 128 else 4, num_stages=2)
    return out
