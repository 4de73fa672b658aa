"""What the streaming KV cache hands self-attention when `infer.attention` is not `sdpa` (issue 9).

`WindowKV` holds one layer's attended window [B, S, H, D] (the cache's BF16 buffer prefix), which regions hold
data, and how to attend it; `attend(q)` runs the Triton window-attention kernel
(kernels/window_attention_triton.py):

    fp8     quantize q, K, V to E4M3 per call (per token/head for q and K - K smoothed by its window mean - per
            head/channel for V) and run the FP8 tensor-core kernel; the cache stays BF16 (the quantization cost
            is in the measurement)
    triton  the same kernel reading the BF16 K/V directly (bf16 tensor cores; a like-for-like check of cuDNN)
    cudnn-fp8  cuDNN's FP8 flash attention (kernels/cudnn_fp8_attention.py) over the cache's E4M3 shadow
            (fp8_kv_cache.py: K/V quantized once when written, static q/K scales, per-head V scales); only q is
            quantized per call. Off CUDA the same FP8 math runs as an exact torch emulation. A window with an
            empty region (an unset shot sink) is attended in BF16 with its mask instead (rare, transient)

The model never branches on this: `AttentionCore` calls `k.attend(q)` when the hook hands it such an object
(the NVFP4 cache's `PackedKV` in fused mode is the other one).
"""
from __future__ import annotations

import dataclasses

import torch

WINDOW_MODES = ("fp8", "triton", "cudnn-fp8")


@dataclasses.dataclass
class FP8Window:
    """The E4M3 shadow of one layer's window (cudnn-fp8 mode): x ~ codes * scale."""

    k8: torch.Tensor           # [B, S, H, D] float8_e4m3fn
    v8: torch.Tensor           # [B, S, H, D] float8_e4m3fn
    q_scale: torch.Tensor      # [] fp32, static (the layer's bound on |q| / 448)
    k_scale: torch.Tensor      # [] fp32, static
    v_scale: torch.Tensor      # [H] fp32, per head


@dataclasses.dataclass
class WindowKV:
    """One layer's attended K/V window plus its region validity."""

    k: torch.Tensor            # [B, S, H, D]
    v: torch.Tensor            # [B, S, H, D]
    valid: torch.Tensor        # [R] bool on k's device, False = empty region (never attended)
    tokens_per_chunk: int
    mode: str                  # one of WINDOW_MODES
    all_valid: bool            # host copy of valid.all(): compiles the kernel without the region check
    fp8: FP8Window | None = None   # cudnn-fp8 mode: the E4M3 shadow of k, v

    @torch.compiler.disable
    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, Sq, H, D] -> [B, Sq, H, D] in q's dtype."""
        from .kernels.window_attention_triton import quantize_fp8, window_attention

        valid = None if self.all_valid else self.valid
        if self.mode == "cudnn-fp8":
            return self._attend_cudnn_fp8(q)
        if self.mode == "fp8":
            key_valid = None if self.all_valid else \
                self.valid.repeat_interleave(self.tokens_per_chunk)[: self.k.shape[1]]
            q8, qs, k8, ks, v8, vs = quantize_fp8(q, self.k, self.v, key_valid)
            return window_attention(q8, k8, v8, self.tokens_per_chunk, valid, mode="fp8", q_scale=qs, k_scale=ks,
                                    v_scale=vs, out_dtype=q.dtype)
        return window_attention(q, self.k, self.v, self.tokens_per_chunk, valid, mode="bf16", out_dtype=q.dtype)

    def _attend_cudnn_fp8(self, q: torch.Tensor) -> torch.Tensor:
        from .kernels.fp8_head_quant_triton import quantize_per_head
        from .kernels.window_attention_ref import fp8_emulation, reference_attention

        if not self.all_valid:      # an empty region inside the window: BF16 attention with its mask (rare)
            return reference_attention(q, self.k, self.v, self.tokens_per_chunk, self.valid, dtype=q.dtype)
        w = self.fp8
        b, sq, h, d = q.shape
        q = q if q.stride(3) == 1 and q.stride(2) == d else q.contiguous()
        q8 = quantize_per_head(q[None], w.q_scale.reshape(1, 1).expand(1, h))[0]
        if q.is_cuda:
            from .kernels.cudnn_fp8_attention import cudnn_fp8_attention

            return cudnn_fp8_attention(q8, w.k8, w.v8, w.q_scale, w.k_scale, d ** -0.5, w.v_scale).to(q.dtype)
        # the same FP8 math in torch (CPU; tests), V's per-head scales applied to its output in fp32, one rounding
        skv = w.k8.shape[1]
        o = fp8_emulation(q8, w.q_scale.expand(b, sq, h), w.k8, w.k_scale.expand(b, skv, h), w.v8,
                          torch.ones(b, h, d, device=q.device), self.tokens_per_chunk)
        return o.mul_(w.v_scale[:, None]).to(q.dtype)
