"""Oracles of the window attention kernel (window_attention_triton.py), plain torch on any device.

`reference_attention`: softmax(q k^T / sqrt(D)) v over the valid regions in float64 (or any dtype).
`fp8_emulation`: the FP8 kernel's math op for op - the same key tiles, online softmax in fp32, E4M3 P scaled by
P_SCALE, fp32 accumulation - so kernel == emulation up to fp32 summation order (a tight test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .window_attention_triton import LOG2E, P_SCALE


def key_mask(skv: int, tokens_per_chunk: int, valid: torch.Tensor | None, device) -> torch.Tensor:
    """[Skv] bool: True = the key's region is valid."""
    if valid is None:
        return torch.ones(skv, dtype=torch.bool, device=device)
    return valid.bool().to(device).repeat_interleave(tokens_per_chunk)[:skv]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_chunk: int,
                        valid: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[B, Sq, H, D] attention of q over the valid keys of k, v [B, Skv, H, D], computed in `dtype`."""
    mask = key_mask(k.shape[1], tokens_per_chunk, valid, q.device)
    k, v = (x.to(dtype).masked_fill(~mask[None, :, None, None], 0) for x in (k, v))   # empty regions: never read
    qt, kt, vt = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[None, None, None, :]).transpose(1, 2)


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """fp32 values of an E4M3 tensor [B, S, H, D] with a per-(token, head) scale [B, S, H] or, per_channel, a
    per-(head, channel) scale [B, H, D]."""
    s = scale[:, None] if per_channel else scale[..., None]
    return x8.float() * s


def fp8_emulation(q8, q_scale, k8, k_scale, v8, v_scale, tokens_per_chunk: int, valid: torch.Tensor | None = None,
                  block_n: int = 32) -> torch.Tensor:
    """The FP8 kernel's arithmetic in torch fp32 (inputs from `quantize_fp8`) -> [B, Sq, H, D] fp32."""
    b, sq, h, d = q8.shape
    skv = k8.shape[1]
    ok_all = key_mask(skv, tokens_per_chunk, valid, q8.device)
    qf = q8.float().transpose(1, 2)                                            # [B, H, Sq, D]
    kf, vf = (x.float().transpose(1, 2).masked_fill(~ok_all[:, None], 0.0) for x in (k8, v8))  # [B, H, Skv, D]
    row = (q_scale.transpose(1, 2) * (d ** -0.5 * LOG2E))                     # [B, H, Sq]
    col_all = k_scale.transpose(1, 2)                                          # [B, H, Skv]
    m = torch.full((b, h, sq), float("-inf"), device=q8.device)
    lsum = torch.zeros(b, h, sq, device=q8.device)
    acc = torch.zeros(b, h, sq, d, device=q8.device)
    for start in range(0, skv, block_n):
        sl = slice(start, min(start + block_n, skv))
        ok = ok_all[sl]
        if not ok.any():
            continue
        s = (qf @ kf[:, :, sl].transpose(-1, -2)) * row[..., None] * col_all[:, :, None, sl]
        s = s.masked_fill(~ok, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_use = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_use)
        p = torch.exp2(s - m_use[..., None])
        lsum = lsum * alpha + p.sum(-1)
        p8 = (p * P_SCALE).to(torch.float8_e4m3fn).float()
        acc = acc * alpha[..., None] + p8 @ vf[:, :, sl]
        m = m_new
    out = acc * (v_scale[:, :, None, :] / P_SCALE) / lsum[..., None]
    return out.transpose(1, 2)
