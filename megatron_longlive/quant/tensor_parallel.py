"""Tensor parallelism for the quantized training linears (FP8Linear; NVFP4Linear runs its own collectives).

A "column" linear holds W rows [N/tp, K] and the matching bias slice: its input is replicated, so the backward
all-reduces dx (megatron's copy-to-region). A "row" linear holds W columns [N, K/tp]: its input is sharded along
K, so the forward all-reduces the partial product before adding the full bias (reduce-from-region). The local
GEMMs are the unsharded recipe applied to the shard: the FP8 channel recipe's per-channel scales are the same
numbers as at TP=1 (channels are only split), its per-row weight scales are the shard's. Sharded parameters
carry megatron's `tensor_model_parallel` / `partition_dim` attributes, so loading full weights, gradient clipping
and DCP checkpoints treat them as they treat megatron-core's own TP linears.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

STYLES = ("column", "row")


def tp_style(style: str, tp_group) -> tuple[str, object]:
    """(style, group) of a linear: unsharded ("replicated", None) without a group or for other styles."""
    if tp_group is None or style not in STYLES:
        return "replicated", None
    return style, tp_group


def mark_tp_parameters(linear: nn.Linear, style: str) -> None:
    """megatron's sharding attributes: W split along rows (column) or columns (row); a column bias along its
    only dim; a row linear's bias is whole (added after the all-reduce)."""
    if style not in STYLES:
        return
    from ..distributed.tensor_parallel import _mark_sharded

    _mark_sharded(linear.weight, 0 if style == "column" else 1)
    if style == "column" and linear.bias is not None:
        _mark_sharded(linear.bias, 0)


def tp_forward(local: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], x: torch.Tensor,
               bias: torch.Tensor | None, style: str, group) -> torch.Tensor:
    """local(x, bias) -> y on this rank's shard, wrapped in the collectives of `style` (module docstring)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        reduce_from_tensor_model_parallel_region)

    if style == "column":
        return local(copy_to_tensor_model_parallel_region(x, group=group), bias)
    if style == "row":
        y = reduce_from_tensor_model_parallel_region(local(x, None), group=group)
        return y if bias is None else y + bias.to(y.dtype)
    return local(x, bias)


def local_features(name: str, in_features: int, out_features: int, style: str, tp_size: int,
                   multiple: int, backend: str) -> tuple[int, int]:
    """(in, out) features of this rank's shard; the split dim must divide into tp_size multiples of `multiple`."""
    if style not in STYLES or tp_size == 1:
        return in_features, out_features
    split = out_features if style == "column" else in_features
    if split % (tp_size * multiple):
        raise ValueError(f"{backend}: {name} ({style}-parallel) has {split} features, not a multiple of tp_size * "
                         f"{multiple} = {tp_size * multiple}. Fix: change parallel.tp_size or keep it in high "
                         f"precision (quant.keep_high_precision)")
    return (in_features // tp_size, out_features) if style == "row" else (in_features, out_features // tp_size)
