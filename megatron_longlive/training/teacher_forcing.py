"""Teacher forcing for chunk-autoregressive video diffusion (DESIGN.md §3): pure functions.

Sequence layout (global order): clean chunks x_0..x_{n-1}, then noisy chunks z_0..z_{n-1}; every
chunk is `chunk_frames` latent frames of `tokens_per_frame` tokens. Block id of clean chunk i is i,
of noisy chunk i is n + i. Attention rule (block granularity):
  * clean x_i attends clean x_j for j <= i;
  * noisy z_i attends clean x_j for j < i, and itself; never another noisy chunk.
"""
from __future__ import annotations

import torch

from ..models.wan.attention import ChunkMask


def tf_block_table(num_chunks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[2n, 2n] bool: allowed[q_block, kv_block] for the [clean | noisy] block order."""
    n = num_chunks
    idx = torch.arange(n, device=device)
    allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=device)
    allowed[:n, :n] = idx[None, :] <= idx[:, None]      # clean -> clean, causal incl. self
    allowed[n:, :n] = idx[None, :] < idx[:, None]       # noisy -> strictly earlier clean
    allowed[n:, n:] = torch.eye(n, dtype=torch.bool, device=device)  # noisy -> itself
    return allowed


def tf_block_ids(num_chunks: int, chunk_frames: int, tokens_per_frame: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """[2 * n * chunk_frames * tokens_per_frame] block id of each token in [clean | noisy] order."""
    per_chunk = chunk_frames * tokens_per_frame
    return torch.arange(2 * num_chunks, device=device).repeat_interleave(per_chunk)


def teacher_forcing_mask(num_chunks: int, chunk_frames: int, tokens_per_frame: int,
                         device: torch.device | str | None = None) -> ChunkMask:
    """The teacher-forcing mask over the [clean | noisy] token sequence."""
    ids = tf_block_ids(num_chunks, chunk_frames, tokens_per_frame, device)
    return ChunkMask(ids, ids, tf_block_table(num_chunks, device))
