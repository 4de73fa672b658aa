"""Ulysses sequence parallelism for one attention core (DESIGN.md §4).

Each SP rank holds a slice of the sequence with all heads: q, k, v `[B, S/sp, H, D]`. An all-to-all
over the SP group (megatron-core's context-parallel group) turns them into the full sequence for
H/sp heads, `[B, S, H/sp, D]`, gathered rank-major (rank 0's tokens, then rank 1's, ...); the wrapped
core attends with a mask given in that gathered order (`balanced_sp.sp_mask`); a second all-to-all
returns `[B, S/sp, H, D]`. The all-to-alls are autograd functions whose backward is the reverse
all-to-all, so gradients are exact. Every rank must hold the same number of tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single on a tensor whose dim 0 is the destination rank; returns dim 0 = source rank."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group, sp: int) -> torch.Tensor:
    """[B, S/sp, H, D] -> [B, S, H/sp, D] (sequence gathered rank-major, heads scattered)."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, sp, h // sp, d).permute(2, 0, 1, 3, 4)  # [sp (dest), B, S/sp, H/sp, D]
    x = _all_to_all(x, group)  # [sp (source), B, S/sp, H/sp, D]
    return x.permute(1, 0, 2, 3, 4).reshape(b, sp * s, h // sp, d)


def heads_to_seq(x: torch.Tensor, group, sp: int) -> torch.Tensor:
    """[B, S, H/sp, D] -> [B, S/sp, H, D] (inverse of `seq_to_heads`)."""
    b, s, h, d = x.shape
    x = x.reshape(b, sp, s // sp, h, d).permute(1, 0, 2, 3, 4)  # [sp (dest = seq owner), B, S/sp, H/sp, D]
    x = _all_to_all(x, group)  # [sp (source = head group), B, S/sp, H/sp, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // sp, sp * h, d)


class _AllToAll(torch.autograd.Function):
    """`seq_to_heads` (to_heads=True) or `heads_to_seq`; the backward is the other direction."""

    @staticmethod
    def forward(ctx, x, group, sp, to_heads):
        ctx.group, ctx.sp, ctx.to_heads = group, sp, to_heads
        return (seq_to_heads if to_heads else heads_to_seq)(x, group, sp)

    @staticmethod
    def backward(ctx, grad):
        return (heads_to_seq if ctx.to_heads else seq_to_heads)(grad, ctx.group, ctx.sp), None, None, None


def all_to_all_seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware `seq_to_heads` over `group`."""
    return _AllToAll.apply(x, group, dist.get_world_size(group), True)


def all_to_all_heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware `heads_to_seq` over `group`."""
    return _AllToAll.apply(x, group, dist.get_world_size(group), False)


class UlyssesAttention(nn.Module):
    """Wraps an attention core: all-to-all seq->heads, masked attention, all-to-all back.

    `mask` must describe the gathered (rank-major) order of the full sequence.
    """

    def __init__(self, core: nn.Module, group):
        super().__init__()
        self.core = core
        self.group = group
        self.sp_size = dist.get_world_size(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        heads = q.shape[2]
        if heads % self.sp_size:
            raise ValueError(f"Ulysses: {heads} local heads are not divisible by sp_size={self.sp_size}. "
                             f"Fix: make tp_size * sp_size divide num_heads.")
        q, k, v = (all_to_all_seq_to_heads(t, self.group) for t in (q, k, v))  # [B, S, H/sp, D]
        out = self.core(q, k, v, mask)
        return all_to_all_heads_to_seq(out, self.group)  # [B, S/sp, H, D]
