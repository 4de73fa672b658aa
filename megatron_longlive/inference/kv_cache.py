"""Typed, preallocated self-attention KV cache for streaming generation (DESIGN.md §6, STYLE.md §7).

Per layer, K and V live in one preallocated buffer [B, R * tokens_per_chunk, H, D] (R regions of one
chunk each), written in place (no torch.cat per layer, shapes fixed once the cache is full):

    region 0                : the chunk being computed now ("current"; rewritten at every pass)
    regions 1 .. s          : global sink   - the first chunk(s) of the video, kept for the whole stream
    regions s+1 .. s+g      : shot sink     - the first chunk(s) of the current shot (issue 8), replaced per shot
    regions s+g+1 .. R-1    : rolling window - the most recent chunks, a ring: the oldest is overwritten

Keys are stored after RoPE, so a chunk keeps the positions it was generated at while the window rolls
and positions keep counting. Attention is order-free over keys, so regions need no reordering; the
hook hands the model the prefix of the buffer that holds data, plus a `ChunkMask` only when a region
inside that prefix is empty (e.g. an unset shot sink).

Transitions (explicit, never a dict): `reset`, `hook(layer)` (write the current chunk, read the
context), `append` (current chunk -> window, evicting the oldest when full), `evict`, `set_sink`
(current chunk -> global or shot sink), `clear_shot_sink`, and `recache` (rewrite the K/V of stored
chunks from one forward over their clean latents, e.g. under a new prompt). Clean latents of stored
chunks are kept beside the K/V so a recache needs no history outside the cache.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..config import InferConfig
from ..models.wan.attention import ChunkMask
from .window_attention import WINDOW_MODES, WindowKV

SinkKind = Literal["global", "shot"]


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Region geometry, in chunks. The attention span is window_chunks + sinks + the current chunk."""

    num_sink_chunks: int
    num_shot_sink_chunks: int
    num_window_chunks: int
    tokens_per_chunk: int

    @property
    def num_slots(self) -> int:
        """Regions that store committed chunks (everything but the current chunk)."""
        return self.num_sink_chunks + self.num_shot_sink_chunks + self.num_window_chunks

    @property
    def num_tokens(self) -> int:
        return (1 + self.num_slots) * self.tokens_per_chunk

    def sink_slots(self, kind: SinkKind) -> range:
        if kind == "global":
            return range(self.num_sink_chunks)
        return range(self.num_sink_chunks, self.num_sink_chunks + self.num_shot_sink_chunks)

    @property
    def window_slots(self) -> range:
        start = self.num_sink_chunks + self.num_shot_sink_chunks
        return range(start, start + self.num_window_chunks)

    def tokens(self, slot: int) -> slice:
        """Token range of a slot in the buffer (slot -1 is the current chunk)."""
        start = (slot + 1) * self.tokens_per_chunk
        return slice(start, start + self.tokens_per_chunk)

    @classmethod
    def from_config(cls, infer: InferConfig, tokens_per_frame: int, patch_frames: int = 1) -> "CacheLayout":
        """Convert InferConfig's latent-frame sizes to chunks; every size must be whole chunks."""
        cf = infer.chunk_frames
        if cf % patch_frames:
            raise ValueError(f"infer.chunk_frames={cf} must be a multiple of the temporal patch size {patch_frames}. "
                             f"Fix: set infer.chunk_frames to a multiple of {patch_frames}")
        for name in ("sink_frames", "shot_sink_frames", "window_frames"):
            if getattr(infer, name) % cf:
                raise ValueError(f"infer.{name}={getattr(infer, name)} is not a whole number of chunks of "
                                 f"infer.chunk_frames={cf}. Fix: use a multiple of {cf}")
        rolling = infer.window_frames - infer.sink_frames - infer.shot_sink_frames - cf
        assert rolling >= 0, "InferConfig guarantees window_frames > sinks, all whole chunks"
        return cls(infer.sink_frames // cf, infer.shot_sink_frames // cf, rolling // cf,
                   (cf // patch_frames) * tokens_per_frame)


class KVCache:
    """Preallocated K/V for every layer plus the clean latents and chunk index of every stored slot."""

    def __init__(self, layout: CacheLayout, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 latent_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, attention: str = "sdpa"):
        if attention not in ("sdpa", *WINDOW_MODES):
            raise ValueError(f"infer.attention={attention!r}: choose sdpa, {', '.join(WINDOW_MODES)}")
        self.layout = layout
        self.num_layers = num_layers
        self.attention = attention        # sdpa: hand the model (K, V, mask); else a WindowKV (window_attention.py)
        shape = (num_layers, batch, layout.num_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # [L, B, R*T, H, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # clean latents of stored chunks [slots, B, C, F, H, W] (for recache); None = not kept
        self.latents = (torch.zeros((layout.num_slots, batch, *latent_shape), dtype=dtype, device=device)
                        if latent_shape is not None else None)
        self.reset()

    # ----- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (buffers are not cleared: empty slots are never read)."""
        self.slot_chunk: list[int | None] = [None] * self.layout.num_slots  # chunk index held by each slot
        self._ring: list[int] = []        # window slots in age order, oldest first
        self._recache_plan: list[int] | None = None
        self._mask_cache: tuple | None = None
        self._layer_hooks = [LayerHook(self, i) for i in range(self.num_layers)]

    def stored_chunks(self) -> list[tuple[int, int]]:
        """(chunk index, slot) of every stored chunk, in temporal order."""
        return sorted((c, s) for s, c in enumerate(self.slot_chunk) if c is not None)

    def sink_full(self, kind: SinkKind) -> bool:
        return all(self.slot_chunk[s] is not None for s in self.layout.sink_slots(kind))

    @property
    def window_full(self) -> bool:
        return len(self._ring) == self.layout.num_window_chunks

    # ----- transitions ------------------------------------------------------------------------------
    def _store(self, slot: int, chunk_index: int, latents: torch.Tensor | None) -> None:
        """Copy the current chunk's K/V (all layers) into `slot`."""
        cur, dst = self.layout.tokens(-1), self.layout.tokens(slot)
        self.k[:, :, dst].copy_(self.k[:, :, cur])
        self.v[:, :, dst].copy_(self.v[:, :, cur])
        if self.latents is not None and latents is not None:
            self.latents[slot].copy_(latents)
        self.slot_chunk[slot] = chunk_index
        self._mask_cache = None

    def set_sink(self, chunk_index: int, kind: SinkKind = "global", latents: torch.Tensor | None = None) -> int:
        """Store the current chunk in the first free slot of the global or shot sink; returns the slot."""
        free = [s for s in self.layout.sink_slots(kind) if self.slot_chunk[s] is None]
        if not free:
            raise RuntimeError(f"the {kind} sink is full ({len(self.layout.sink_slots(kind))} chunks)")
        self._store(free[0], chunk_index, latents)
        return free[0]

    def clear_shot_sink(self) -> None:
        """A new shot starts: its first chunk(s) will replace the shot sink."""
        for s in self.layout.sink_slots("shot"):
            self.slot_chunk[s] = None
        self._mask_cache = None

    def evict(self) -> int:
        """Drop the oldest window chunk; returns the freed slot."""
        if not self._ring:
            raise RuntimeError("evict() on an empty window")
        slot = self._ring.pop(0)
        self.slot_chunk[slot] = None
        self._mask_cache = None
        return slot

    def append(self, chunk_index: int, latents: torch.Tensor | None = None) -> int | None:
        """Store the current chunk in the rolling window (evicting the oldest if full); returns the slot.
        With a zero-size window the chunk is simply not kept (returns None)."""
        if self.layout.num_window_chunks == 0:
            return None
        if self.window_full:
            self.evict()
        used = set(self._ring)
        slot = next(s for s in self.layout.window_slots if s not in used)
        self._store(slot, chunk_index, latents)
        self._ring.append(slot)
        return slot

    def begin_recache(self) -> list[int]:
        """Next forward rewrites the stored chunks' K/V. The caller runs one forward over the stored chunks'
        tokens in the returned temporal order (chunk indices), with a block-causal mask over them."""
        plan = self.stored_chunks()
        self._recache_plan = [s for _, s in plan]
        return [c for c, _ in plan]

    def end_recache(self) -> None:
        self._recache_plan = None

    # ----- the model-facing hook ----------------------------------------------------------------------
    def _context_mask(self, num_queries: int, end: int, device) -> ChunkMask | None:
        """None when every region below `end` holds data, else a mask hiding the empty regions."""
        tpc = self.layout.tokens_per_chunk
        valid = [True] + [c is not None for c in self.slot_chunk]
        valid = valid[: end // tpc]
        if all(valid):
            return None
        key = (num_queries, end)
        if self._mask_cache is None or self._mask_cache[0] != key:
            allowed = torch.tensor([valid], dtype=torch.bool, device=device)        # [1, regions]
            kv_blocks = torch.arange(len(valid), device=device).repeat_interleave(tpc)
            q_blocks = torch.zeros(num_queries, dtype=torch.long, device=device)
            self._mask_cache = (key, ChunkMask(q_blocks, kv_blocks, allowed))
        return self._mask_cache[1]

    def hook(self, layer: int) -> "LayerHook":
        """The `KVHook` of layer `layer` for `WanDiT.forward_tokens` (one stable object per layer)."""
        return self._layer_hooks[layer]

    def context_signature(self) -> tuple[int, bool]:
        """(tokens the next chunk pass attends, whether that needs a mask): the shape-defining state of a
        chunk pass, so a compiled / CUDA-graphed step can be keyed by it (inference/chunk_step.py)."""
        tpc = self.layout.tokens_per_chunk
        used = [s for s, c in enumerate(self.slot_chunk) if c is not None]
        end = (max(used) + 2) * tpc if used else tpc
        return end, not all(c is not None for c in self.slot_chunk[: end // tpc - 1])

    def _chunk_hook(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask):
        """k, v: [B, tokens_per_chunk, H, D] of the current chunk -> (K, V, mask) over context + chunk."""
        assert mask is None, "the streaming forward of one chunk takes no mask of its own"
        tpc = self.layout.tokens_per_chunk
        assert k.shape[1] == tpc, f"chunk has {k.shape[1]} tokens, the cache expects {tpc}"
        self.k[layer, :, :tpc].copy_(k)
        self.v[layer, :, :tpc].copy_(v)
        end, _ = self.context_signature()
        if self.attention != "sdpa":
            return self._window(layer, end), None, None
        return self.k[layer, :, :end], self.v[layer, :, :end], self._context_mask(tpc, end, k.device)

    def _window(self, layer: int, end: int) -> WindowKV:
        """Layer `layer`'s first `end` tokens as a WindowKV (attention via the Triton window kernel)."""
        flags = (True, *(c is not None for c in self.slot_chunk))[: end // self.layout.tokens_per_chunk]
        if getattr(self, "_valid", (None,))[0] != flags:       # one host->device copy per cache state, not per layer
            self._valid = (flags, torch.tensor(flags, device=self.k.device))
        return WindowKV(self.k[layer, :, :end], self.v[layer, :, :end], self._valid[1],
                        self.layout.tokens_per_chunk, self.attention, all(flags))

    def _recache_hook(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask):
        """k, v: [B, n * tokens_per_chunk, H, D] of the stored chunks in temporal order: write them back."""
        tpc = self.layout.tokens_per_chunk
        assert k.shape[1] == len(self._recache_plan) * tpc, "recache forward must cover exactly the stored chunks"
        for i, slot in enumerate(self._recache_plan):
            dst = self.layout.tokens(slot)
            self.k[layer, :, dst].copy_(k[:, i * tpc:(i + 1) * tpc])
            self.v[layer, :, dst].copy_(v[:, i * tpc:(i + 1) * tpc])
        return k, v, mask

    def memory_bytes(self) -> int:
        total = self.k.numel() * self.k.element_size() * 2
        if self.latents is not None:
            total += self.latents.numel() * self.latents.element_size()
        return total


class LayerHook:
    """The KV hook of one layer: a stable object (not a fresh lambda per call) whose bookkeeping runs
    eagerly, so a `torch.compile`d block sees the same callable type for every layer and chunk and
    compiles once (the cache's Python state - slots, rings, plans - never becomes a compile guard)."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    @torch.compiler.disable
    def __call__(self, k: torch.Tensor, v: torch.Tensor, mask):
        if self.cache._recache_plan is not None:
            return self.cache._recache_hook(self.layer, k, v, mask)
        return self.cache._chunk_hook(self.layer, k, v, mask)
