"""NVFP4 KV cache: the streaming `KVCache` (inference/kv_cache.py) with K and V stored as packed NVFP4.

Selected by `quant.kv_cache=nvfp4`. Same regions, slots and transitions as the BF16 cache (it is a
subclass: `reset`, `hook`, `append`, `evict`, `set_sink`, `clear_shot_sink`, `begin_recache`/`end_recache`
are inherited); only the storage differs. Per layer and per region (one chunk of tokens):

    codes   [L, B, R*T, H, D/2]  uint8, two E2M1 codes per byte (element 2i in the low nibble)
    scales  [L, B, R*T, H, D/16] float8_e4m3fn, one per 16 values along the head dim
    ts      [L, R]               fp32 decode scale of the region (its chunk amax / 2688)

for K and V each, preallocated once and written in place. A chunk is quantized once when it is written
(`reference.quantize` of the chunk's [B, T, H, D], bit for bit; on CUDA the Triton quantizer, which is
bitwise equal), and committing it to a slot copies bytes, so a stored chunk never requantizes. The
current chunk is quantized too: its own denoising passes attend its quantized K/V, as the stored ones do.
4.5 bits per value + 4 bytes per region: 16 / 4.5 = 3.56x smaller than BF16.

Attention over the cache: the hook returns either dequantized K/V (`attention="dequant"`, the reference
path that works with today's `AttentionCore`) or a `PackedKV` (`attention="fused"`) whose `attend(q)`
runs the fused Triton kernel (inference/kernels/window_attention_triton.py, mode nvfp4; the slower split-P kernel
kernels/kv_attention_triton.py with `attend(q, exact=True)`) and never builds a BF16 copy of the window.
The recache forward attends its own full-precision K/V (as with the BF16 cache) and writes them quantized.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

import torch
import torch.nn.functional as F

from ...inference.kv_cache import CacheLayout, KVCache
from ...models.wan.attention import ChunkMask
from ..constants import BLOCK
from . import reference

AttentionMode = Literal["dequant", "fused"]


def quantize_chunk(x: torch.Tensor, amax: torch.Tensor | None = None) -> reference.NVFP4Quantized:
    """One chunk's K or V [B, T, H, D] -> NVFP4 with one tensor scale for the chunk (1x16 blocks along D).

    CPU: the reference quantizer. CUDA: the Triton quantizer (bitwise equal), without the finite check so
    that a chunk step has no host sync. amax: the chunk's max |value| when x is a shard of it (SP: H/N heads)."""
    if not x.is_cuda:
        return reference.quantize(x, amax=amax)
    from .kernels import ops

    return ops.quantize(x, check_finite=False, amax=amax)


@dataclasses.dataclass
class PackedKV:
    """One layer's packed K/V prefix [B, S, H, *] plus its region scales and validity: what attention reads."""

    k_codes: torch.Tensor      # [B, S, H, D/2] uint8
    k_scales: torch.Tensor     # [B, S, H, D/16] float8_e4m3fn
    k_ts: torch.Tensor         # [R] fp32
    v_codes: torch.Tensor
    v_scales: torch.Tensor
    v_ts: torch.Tensor
    valid: torch.Tensor        # [R] bool, False = empty region (never attended)
    tokens_per_chunk: int
    all_valid: bool | None = None   # host copy of valid.all() (None: read it from valid, a device sync)

    def __post_init__(self):
        if self.all_valid is None:
            self.all_valid = bool(self.valid.all())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, S, H, D] by the reference dequantizer, region by region (materialises the window)."""
        t = self.tokens_per_chunk
        ts = [x.repeat_interleave(t)[: self.k_codes.shape[1]] for x in (self.k_ts, self.v_ts)]
        out = []
        for codes, scales, s in ((self.k_codes, self.k_scales, ts[0]), (self.v_codes, self.v_scales, ts[1])):
            x = reference.dequantize(codes, scales, torch.ones((), device=codes.device))  # (value * sb) * 1
            out.append((x * s[None, :, None, None]).to(dtype))                           # * region scale
        return out[0], out[1]

    def mask(self, num_queries: int) -> ChunkMask | None:
        """A ChunkMask hiding the empty regions (None when all hold data)."""
        if bool(self.valid.all()):
            return None
        dev = self.valid.device
        kv_blocks = torch.arange(self.valid.numel(), device=dev).repeat_interleave(self.tokens_per_chunk)
        return ChunkMask(torch.zeros(num_queries, dtype=torch.long, device=dev),
                         kv_blocks[: self.k_codes.shape[1]], self.valid[None])

    def reference_attention(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The oracle: dequantize the whole prefix (fp32, exact), then SDPA in `dtype` (fp32 or fp64).
        q [B, Sq, H, D] -> [B, Sq, H, D] in `dtype`."""
        k, v = self.dequantize(torch.float32)
        m = self.mask(q.shape[1])
        qt, kt, vt = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m.dense() if m is not None else None)
        return out.transpose(1, 2)

    @torch.compiler.disable
    def attend(self, q: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Fused Triton attention (CUDA, or CPU under TRITON_INTERPRET=1) -> [B, Sq, H, D] in q's dtype.

        Default: the fast window kernel (inference/kernels/window_attention_triton.py, mode nvfp4: one bf16
        P @ V dot, ~2**-9). exact: the split-P kernel (kernels/kv_attention_triton.py, ~2**-16, slow)."""
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("PackedKV.attend runs the Triton kernel: it needs CUDA or TRITON_INTERPRET=1 set "
                               "before triton is imported. On CPU use reference_attention (or attention='dequant')")
        if exact:
            from .kernels.kv_attention_triton import nvfp4_kv_attention

            out = nvfp4_kv_attention(q, self.k_codes, self.k_scales, self.k_ts, self.v_codes, self.v_scales,
                                     self.v_ts, self.tokens_per_chunk, self.valid, split_p=True)
            return out.to(q.dtype)
        from ...inference.kernels.window_attention_triton import window_attention

        return window_attention(q, self.k_codes, self.v_codes, self.tokens_per_chunk,
                                None if self.all_valid else self.valid, mode="nvfp4", k_scale=self.k_scales,
                                v_scale=self.v_scales, k_ts=self.k_ts, v_ts=self.v_ts, out_dtype=q.dtype)


class NVFP4KVCache(KVCache):
    """`KVCache` whose K/V are packed NVFP4 (see module docstring). Same constructor plus `attention`."""

    def __init__(self, layout: CacheLayout, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 latent_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, attention: AttentionMode = "dequant"):
        if head_dim % BLOCK:
            raise ValueError(f"quant.kv_cache=nvfp4 needs head_dim divisible by {BLOCK}, got {head_dim}. "
                             "Fix: set quant.kv_cache=bf16 for this model")
        if attention not in ("dequant", "fused"):
            raise ValueError(f"NVFP4KVCache attention={attention!r}: use 'dequant' or 'fused'")
        # not KVCache.__init__: that would allocate the BF16 K/V this class replaces
        self.layout = layout
        self.num_layers = num_layers
        self.attention = attention
        self.dtype = dtype                      # of the dequantized K/V the 'dequant' hook returns
        n, r = layout.num_tokens, 1 + layout.num_slots
        codes = (num_layers, batch, n, num_heads, head_dim // 2)
        scales = (num_layers, batch, n, num_heads, head_dim // BLOCK)
        self.k_codes = torch.zeros(codes, dtype=torch.uint8, device=device)
        self.v_codes = torch.zeros(codes, dtype=torch.uint8, device=device)
        self.k_scales = torch.zeros(scales, dtype=torch.float8_e4m3fn, device=device)
        self.v_scales = torch.zeros(scales, dtype=torch.float8_e4m3fn, device=device)
        self.k_ts = torch.zeros(num_layers, r, dtype=torch.float32, device=device)      # region 0 = current
        self.v_ts = torch.zeros(num_layers, r, dtype=torch.float32, device=device)
        self.latents = (torch.zeros((layout.num_slots, batch, *latent_shape), dtype=dtype, device=device)
                        if latent_shape is not None else None)
        self.reset()

    # ----- storage ------------------------------------------------------------------------------------
    def _write(self, layer: int, region: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize one chunk's k, v [B, T, H, D] into region `region` (0 = current) of `layer`, in place."""
        tok = self.layout.tokens(region - 1)
        amax = self.chunk_amax(k, v)
        for x, a, codes, scales, ts in ((k, amax[0], self.k_codes, self.k_scales, self.k_ts),
                                        (v, amax[1], self.v_codes, self.v_scales, self.v_ts)):
            qx = quantize_chunk(x, a)
            codes[layer, :, tok].copy_(qx.packed)
            scales[layer, :, tok].copy_(qx.scales)
            ts[layer, region].copy_(qx.tensor_scale)

    def chunk_amax(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Tensor amax of one chunk's K and V for its region scales; None = the tensor's own max |value|. A
        head-sharded cache (distributed/sp_inference.py) returns the max over all shards instead."""
        return None, None

    def _store(self, slot: int, chunk_index: int, latents: torch.Tensor | None) -> None:
        """Copy the current chunk's packed K/V (all layers) into `slot`: bytes, no requantization."""
        cur, dst = self.layout.tokens(-1), self.layout.tokens(slot)
        for buf in (self.k_codes, self.v_codes, self.k_scales, self.v_scales):
            buf[:, :, dst].copy_(buf[:, :, cur])
        for ts in (self.k_ts, self.v_ts):
            ts[:, slot + 1].copy_(ts[:, 0])
        if self.latents is not None and latents is not None:
            self.latents[slot].copy_(latents)
        self.slot_chunk[slot] = chunk_index
        self._mask_cache = None

    def packed(self, layer: int, end: int | None = None) -> PackedKV:
        """Layer `layer`'s packed K/V over the first `end` tokens (default: up to the last stored slot)."""
        tpc = self.layout.tokens_per_chunk
        if end is None:
            end, _ = self.context_signature()
        regions = end // tpc
        flags = (True, *(c is not None for c in self.slot_chunk))
        if getattr(self, "_valid", (None,))[0] != flags:       # one host->device copy per cache state, not per layer
            self._valid = (flags, torch.tensor(flags, device=self.k_ts.device))
        valid = self._valid[1]
        return PackedKV(self.k_codes[layer, :, :end], self.k_scales[layer, :, :end], self.k_ts[layer, :regions],
                        self.v_codes[layer, :, :end], self.v_scales[layer, :, :end], self.v_ts[layer, :regions],
                        valid[:regions], tpc, all(flags[:regions]))

    # ----- the model-facing hook ----------------------------------------------------------------------
    def _chunk_hook(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask):
        """Quantize the current chunk into region 0, then hand attention the packed prefix: dequantized
        (k, v, mask) in 'dequant' mode, or (PackedKV, None, None) in 'fused' mode."""
        assert mask is None, "the streaming forward of one chunk takes no mask of its own"
        tpc = self.layout.tokens_per_chunk
        assert k.shape[1] == tpc, f"chunk has {k.shape[1]} tokens, the cache expects {tpc}"
        self._write(layer, 0, k, v)
        kv = self.packed(layer)
        if self.attention == "fused":
            return kv, None, None
        kd, vd = kv.dequantize(k.dtype)
        return kd, vd, self._context_mask(tpc, kd.shape[1], k.device)

    def _recache_hook(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask):
        """k, v: [B, n * tokens_per_chunk, H, D] of the stored chunks in temporal order: quantize them back."""
        tpc = self.layout.tokens_per_chunk
        assert k.shape[1] == len(self._recache_plan) * tpc, "recache forward must cover exactly the stored chunks"
        for i, slot in enumerate(self._recache_plan):
            self._write(layer, slot + 1, k[:, i * tpc:(i + 1) * tpc], v[:, i * tpc:(i + 1) * tpc])
        return k, v, mask

    def kv_bytes(self) -> int:
        """Bytes of the K/V storage (codes + block scales + region scales)."""
        bufs = (self.k_codes, self.v_codes, self.k_scales, self.v_scales, self.k_ts, self.v_ts)
        return sum(b.numel() * b.element_size() for b in bufs)

    def memory_bytes(self) -> int:
        total = self.kv_bytes()
        if self.latents is not None:
            total += self.latents.numel() * self.latents.element_size()
        return total


def build_kv_cache(kind: str, layout: CacheLayout, num_layers: int, batch: int, num_heads: int, head_dim: int,
                   latent_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, attention: str = "sdpa") -> KVCache:
    """`quant.kv_cache` -> the cache: 'bf16' (K/V in the model dtype) or 'nvfp4'. attention (`infer.attention`):
    sdpa (the model's core; the NVFP4 cache dequantizes), triton (Triton window kernel over the cache's own
    storage: BF16, or packed NVFP4 = 'fused'), fp8 (BF16 cache only: E4M3 per call) or cudnn-fp8 (BF16 cache with an
    E4M3 shadow, inference/fp8_kv_cache.py). 'dequant'/'fused' name the
    NVFP4 modes directly."""
    if kind == "bf16":
        if attention in ("dequant", "fused"):
            raise ValueError(f"attention={attention!r} is an NVFP4-cache mode; the BF16 cache takes sdpa, triton, fp8 "
                             "or cudnn-fp8")
        if attention == "cudnn-fp8":
            from ...inference.fp8_kv_cache import FP8WindowKVCache

            return FP8WindowKVCache(layout, num_layers, batch, num_heads, head_dim, latent_shape, dtype, device)
        return KVCache(layout, num_layers, batch, num_heads, head_dim, latent_shape, dtype, device, attention)
    if kind == "nvfp4":
        modes = {"sdpa": "dequant", "triton": "fused", "dequant": "dequant", "fused": "fused"}
        if attention not in modes:
            raise ValueError(f"infer.attention={attention!r} with quant.kv_cache=nvfp4: use sdpa or triton "
                             "(fp8 / cudnn-fp8 quantize a BF16 window; the NVFP4 cache has its own fused kernel)")
        return NVFP4KVCache(layout, num_layers, batch, num_heads, head_dim, latent_shape, dtype, device,
                            modes[attention])
    raise ValueError(f"quant.kv_cache={kind!r}: choose 'bf16' or 'nvfp4'")
