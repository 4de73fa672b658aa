"""Attention core and the chunk-level mask spec it consumes.

`ChunkMask` describes a block-structured mask without materialising [S, S]: every query token and
key token carries a block id, and a small boolean table says which query block may see which key
block. Teacher forcing, block-causal generation, sinks/windows and the rank-major order produced by
Ulysses all-to-all are just different ids and tables. The core turns it into a dense boolean mask for
small sequences (CPU tests) or a FlexAttention `BlockMask` on CUDA, so no [s, s] float mask is ever
built at 1.3B scale.

`AttentionCore` is a module so that sequence parallelism can wrap it from outside (Ulysses).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Above this many query x key pairs the CUDA path uses FlexAttention instead of a dense bool mask.
_DENSE_LIMIT = 64 * 1024 * 1024

# SDPA backend order on CUDA: cuDNN first (measured 2x FlashAttention-2 on H100 for the streaming
# shapes, DESIGN.md §6), then flash / memory-efficient; math only as the last resort.
_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


@dataclasses.dataclass
class ChunkMask:
    """Block-structured attention mask.

    q_blocks: [Sq] long, block id of each query token.
    kv_blocks: [Skv] long, block id of each key token.
    allowed: [Nq, Nkv] bool, allowed[i, j] = a query in block i may attend a key in block j.
    """

    q_blocks: torch.Tensor
    kv_blocks: torch.Tensor
    allowed: torch.Tensor
    # FlexAttention BlockMasks built from this mask, by block size: every layer (and the recompute in
    # backward) reuses one instead of re-evaluating the mask per attention call.
    _flex_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def dense(self) -> torch.Tensor:
        """[Sq, Skv] bool; True = attend."""
        return self.allowed[self.q_blocks[:, None], self.kv_blocks[None, :]]

    def to(self, device) -> "ChunkMask":
        return ChunkMask(self.q_blocks.to(device), self.kv_blocks.to(device), self.allowed.to(device))

    def permute(self, q_order: torch.Tensor, kv_order: torch.Tensor | None = None) -> "ChunkMask":
        """The same mask for tokens re-ordered by index tensors (new position i holds old token order[i])."""
        kv_order = q_order if kv_order is None else kv_order
        return ChunkMask(self.q_blocks[q_order], self.kv_blocks[kv_order], self.allowed)

    def flex_block_mask(self, block_size: int = 128):
        """A FlexAttention BlockMask with the same pattern (CUDA path), built once and cached.

        `_compile=True` evaluates the mask in tiles, so the [Sq, Skv] boolean mask is never materialised.
        """
        if block_size not in self._flex_cache:
            from torch.nn.attention.flex_attention import create_block_mask

            qb, kb, allowed = self.q_blocks, self.kv_blocks, self.allowed

            def mask_mod(b, h, q_idx, kv_idx):
                return allowed[qb[q_idx], kb[kv_idx]]

            self._flex_cache[block_size] = create_block_mask(mask_mod, None, None, qb.numel(), kb.numel(),
                                                             device=qb.device, BLOCK_SIZE=block_size, _compile=True)
        return self._flex_cache[block_size]


def block_causal_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int,
                      device: torch.device | str | None = None) -> ChunkMask:
    """Plain block-causal mask over a video: tokens of chunk c see chunks 0..c (bidirectional inside a chunk)."""
    frame_ids = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    blocks = frame_ids // chunk_frames
    n = int(blocks[-1].item()) + 1 if blocks.numel() else 0
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
    return ChunkMask(blocks, blocks, allowed)


_flex_compiled = None


def _flex_attention(q, k, v, block_mask):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v with an optional ChunkMask or bool mask. q, k, v: [B, S, H, D]. k may instead be
    a KV cache's window object with `attend(q)` (inference/window_attention.py): it then attends itself."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: ChunkMask | torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(k, "attend"):      # a cache's window object (WindowKV, PackedKV): its own fused kernel, v is None
            return k.attend(q)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if isinstance(mask, ChunkMask):
            if q.is_cuda and q.shape[2] * k.shape[2] > _DENSE_LIMIT:
                out = _flex_attention(q, k, v, mask.flex_block_mask())
                return out.transpose(1, 2)
            mask = mask.dense()
        if q.is_cuda:
            with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)
