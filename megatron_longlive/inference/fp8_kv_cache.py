"""The BF16 KV cache plus an E4M3 shadow of K and V, for `infer.attention=cudnn-fp8` (issue 9).

cuDNN's FP8 attention takes one scalar descale per q, K and V tensor, and the window must not be re-quantized on
every call (that pass would cost a quarter of what FP8 attention saves). So the scales are chosen once:

    q, K   static per layer: Wan RMS-normalizes q and k over the full model dim before RoPE, so every element obeys
           |x| <= sqrt(dim) * max|gamma| (a unit-RMS vector has sum x^2 <= dim; RoPE rotates channel pairs, keeping
           each pair's norm). scale = 1.02 * bound / 448 (the margin covers bf16 rounding; beyond saturates).
           E4M3 keeps 3 significant bits over 15 binades below the bound, so a loose bound costs no precision on
           the values that matter. K is quantized once, when its chunk is written; its codes move with the chunk.
    V      per head (folded into the output after the attention: out_h = (P @ v8)_h * scale_h), from the stored
           chunks: V_MARGIN * amax / 448, recomputed and the stored V re-quantized from BF16 whenever a chunk is
           stored (once per chunk, all layers at once); the current chunk is quantized with the same scale
           (values beyond V_MARGIN x the stored amax saturate). Before anything is stored, the current chunk's
           own amax. Per-head scales also make a head-sharded SP cache quantize exactly like one rank.

The BF16 K/V stay the source of truth (recache, and the rare window with an empty region, attend them).
Memory: K/V storage x1.5.
"""
from __future__ import annotations

import math

import torch

from .kernels.fp8_head_quant_triton import quantize_per_head
from .kernels.fp8_window_quant_triton import e4m3_scale
from .kv_cache import CacheLayout, KVCache
from .window_attention import FP8Window

V_MARGIN = 4.0          # headroom of the stored V scale for the current chunk (2 of E4M3's 15 binades)
BOUND_MARGIN = 1.02     # bf16 rounding of the norm, its weight and RoPE


def qk_static_bounds(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer bounds [L] on |q| and |k| after the qk RMS norm and RoPE of a WanDiT's self-attention."""
    dim = model.cfg.dim
    bounds = []
    for i, block in enumerate(model.blocks):
        attn = block.self_attn
        row = []
        for name in ("norm_q", "norm_k"):
            weight = getattr(getattr(attn, name), "weight", None)
            if weight is None:
                raise ValueError(f"infer.attention=cudnn-fp8 needs the qk RMS norm (static q/K scales): layer {i} "
                                 f"has no {name} weight (qk_norm off). Fix: infer.attention=sdpa or fp8")
            row.append(math.sqrt(dim) * weight.detach().abs().max().float().item() * BOUND_MARGIN)
        bounds.append(row)
    b = torch.tensor(bounds, dtype=torch.float32)
    return b[:, 0], b[:, 1]


def with_static_bounds(cache: KVCache, model: torch.nn.Module) -> KVCache:
    """Give an FP8WindowKVCache the model's static q/K bounds (any other cache is returned as is)."""
    if isinstance(cache, FP8WindowKVCache):
        cache.set_qk_bounds(*qk_static_bounds(model))
    return cache


def _absmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """max |x| over dims in fp32, one reduction without an |x| temporary (the window of all layers is GBs)."""
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=dims).float()


class FP8WindowKVCache(KVCache):
    """KVCache (BF16 K/V, the source of truth) + E4M3 copies k8/v8 of the same layout and their scales."""

    def __init__(self, layout: CacheLayout, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 latent_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, attention: str = "cudnn-fp8"):
        if attention != "cudnn-fp8":
            raise ValueError(f"FP8WindowKVCache serves infer.attention=cudnn-fp8, not {attention!r}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            from .kernels.cudnn_fp8_attention import unavailable_reason

            reason = unavailable_reason(dev)
            if reason:
                raise ValueError(reason)
        super().__init__(layout, num_layers, batch, num_heads, head_dim, latent_shape, dtype, device, attention)
        self.k8 = torch.zeros(self.k.shape, dtype=torch.float8_e4m3fn, device=self.k.device)
        self.v8 = torch.zeros(self.v.shape, dtype=torch.float8_e4m3fn, device=self.v.device)
        f32 = dict(dtype=torch.float32, device=self.k.device)
        self.q_scale = torch.zeros(num_layers, **f32)             # set by set_qk_bounds (0 = not set)
        self.k_scale = torch.zeros(num_layers, **f32)
        self.v_scale = torch.ones(num_layers, num_heads, **f32)   # of the stored chunks, per head
        self._bounds_set = False

    def set_qk_bounds(self, q_bound: torch.Tensor, k_bound: torch.Tensor) -> None:
        """Static bounds [L] on |q| and |k| (qk_static_bounds(model)) -> the layers' q and K scales."""
        for name, bound in (("q", q_bound), ("k", k_bound)):
            if bound.shape != (self.num_layers,) or not bool((bound > 0).all()):
                raise ValueError(f"set_qk_bounds: {name} bounds must be {self.num_layers} positive values, got "
                                 f"{tuple(bound.shape)}")
        self.q_scale.copy_(e4m3_scale(q_bound.float().to(self.q_scale.device)))
        self.k_scale.copy_(e4m3_scale(k_bound.float().to(self.k_scale.device)))
        self._bounds_set = True

    # ----- the stored chunks' codes ------------------------------------------------------------------------------
    def _stored_slots(self) -> list[int]:
        return [s for s, c in enumerate(self.slot_chunk) if c is not None]

    def _requantize(self, k_too: bool) -> None:
        """V (and, after a recache, K) of every stored slot from BF16, with V's scales recomputed over them."""
        slots = self._stored_slots()
        if not slots:
            return
        amax = torch.zeros_like(self.v_scale)
        for s in slots:
            tok = self.layout.tokens(s)
            amax = torch.maximum(amax, _absmax(self.v[:, :, tok], dims=(1, 2, 4)))
        self.v_scale.copy_(e4m3_scale(amax * V_MARGIN))
        k_scale = self.k_scale[:, None].expand(-1, self.v_scale.shape[1])
        for s in slots:
            tok = self.layout.tokens(s)
            quantize_per_head(self.v[:, :, tok], self.v_scale, out=self.v8[:, :, tok])
            if k_too:
                quantize_per_head(self.k[:, :, tok], k_scale, out=self.k8[:, :, tok])

    def _store(self, slot: int, chunk_index: int, latents: torch.Tensor | None) -> None:
        super()._store(slot, chunk_index, latents)
        cur, dst = self.layout.tokens(-1), self.layout.tokens(slot)
        self.k8[:, :, dst].copy_(self.k8[:, :, cur])   # static K scale: the current chunk's codes stay valid
        self._requantize(k_too=False)

    def end_recache(self) -> None:
        super().end_recache()
        self._requantize(k_too=True)

    # ----- the model-facing hook ----------------------------------------------------------------------------------
    def _chunk_hook(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask):
        if not self._bounds_set:
            raise RuntimeError("FP8WindowKVCache: call set_qk_bounds(*qk_static_bounds(model)) before the first "
                               "chunk (the engine does)")
        window, _, _ = super()._chunk_hook(layer, k, v, mask)   # writes the BF16 chunk (the source of truth)
        tpc, heads, end = self.layout.tokens_per_chunk, self.v_scale.shape[1], window.k.shape[1]
        cur = slice(layer, layer + 1)
        k, v = self.k[cur, :, :tpc], self.v[cur, :, :tpc]     # [1, B, T, H, D] views of what was just written
        if self._stored_slots():
            v_scale = self.v_scale[layer]
        else:                                                  # nothing stored yet: the chunk's own amax
            v_scale = e4m3_scale(_absmax(v, dims=(0, 1, 2, 4)))
        quantize_per_head(k, self.k_scale[cur, None].expand(1, heads), out=self.k8[cur, :, :tpc])
        quantize_per_head(v, v_scale[None], out=self.v8[cur, :, :tpc])
        window.fp8 = FP8Window(self.k8[layer, :, :end], self.v8[layer, :, :end], self.q_scale[layer],
                               self.k_scale[layer], v_scale)
        return window, None, None

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.k8.numel() + self.v8.numel()
