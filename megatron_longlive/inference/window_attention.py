"""What the streaming KV cache hands self-attention when `infer.attention` is not `sdpa` (issue 9).

`WindowKV` holds one layer's attended window [B, S, H, D] (the cache's BF16 buffer prefix), which regions hold
data, and how to attend it; `attend(q)` runs the Triton window-attention kernel
(kernels/window_attention_triton.py):

    fp8     quantize q, K, V to E4M3 per call (per token/head for q and K - K smoothed by its window mean - per
            head/channel for V) and run the FP8 tensor-core kernel; the cache stays BF16 (the quantization cost
            is in the measurement)
    triton  the same kernel reading the BF16 K/V directly (bf16 tensor cores; a like-for-like check of cuDNN)

The model never branches on this: `AttentionCore` calls `k.attend(q)` when the hook hands it such an object
(the NVFP4 cache's `PackedKV` in fused mode is the other one).
"""
from __future__ import annotations

import dataclasses

import torch

WINDOW_MODES = ("fp8", "triton")


@dataclasses.dataclass
class WindowKV:
    """One layer's attended K/V window plus its region validity."""

    k: torch.Tensor            # [B, S, H, D]
    v: torch.Tensor            # [B, S, H, D]
    valid: torch.Tensor        # [R] bool on k's device, False = empty region (never attended)
    tokens_per_chunk: int
    mode: str                  # one of WINDOW_MODES
    all_valid: bool            # host copy of valid.all(): compiles the kernel without the region check

    @torch.compiler.disable
    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, Sq, H, D] -> [B, Sq, H, D] in q's dtype."""
        from .kernels.window_attention_triton import quantize_fp8, window_attention

        valid = None if self.all_valid else self.valid
        if self.mode == "fp8":
            key_valid = None if self.all_valid else \
                self.valid.repeat_interleave(self.tokens_per_chunk)[: self.k.shape[1]]
            q8, qs, k8, ks, v8, vs = quantize_fp8(q, self.k, self.v, key_valid)
            return window_attention(q8, k8, v8, self.tokens_per_chunk, valid, mode="fp8", q_scale=qs, k_scale=ks,
                                    v_scale=vs, out_dtype=q.dtype)
        return window_attention(q, self.k, self.v, self.tokens_per_chunk, valid, mode="bf16", out_dtype=q.dtype)
