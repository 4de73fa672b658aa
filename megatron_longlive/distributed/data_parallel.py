"""Gradient reduction over the data x sequence parallel ranks.

Every SP rank computes a *share* of its video's loss (shares sum to the video loss), and every DP rank
a different video, so a replicated parameter's gradient is the SUM over the SP group and the MEAN over
the DP group; TP-sharded parameters reduce over the same (dp x sp) group of ranks holding the same
shard (megatron-core's dp-cp group). `allreduce_gradients` does this after backward with flattened
buckets on any backend (gloo on CPU, NCCL on GPU). On CUDA, `parallel.ddp_impl` selects megatron-core's
DistributedDataParallel instead (`mcore_ddp.py`: reduction overlapped with backward); this module stays the
CPU/gloo path, where megatron-core's DDP cannot run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .grid import ProcessGroups

_BUCKET_BYTES = 64 * 1024 * 1024


def allreduce_gradients(model: nn.Module | list, groups: ProcessGroups, bucket_bytes: int = _BUCKET_BYTES) -> None:
    """grad <- sum over SP, mean over DP, in place, for every parameter (of a module or a list) with a gradient."""
    if groups.dp_sp is None:
        return
    params = model.parameters() if isinstance(model, nn.Module) else model
    grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    filled: dict[torch.dtype, int] = {}
    for g in grads:
        per_dtype = buckets.setdefault(g.dtype, [[]])
        size = g.numel() * g.element_size()
        if per_dtype[-1] and filled.get(g.dtype, 0) + size > bucket_bytes:
            per_dtype.append([])
            filled[g.dtype] = 0
        per_dtype[-1].append(g)
        filled[g.dtype] = filled.get(g.dtype, 0) + size
    for per_dtype in buckets.values():
        for bucket in per_dtype:
            if not bucket:
                continue
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=groups.dp_sp)
            if groups.dp_size > 1:
                flat.div_(groups.dp_size)
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(reduced)


def reduce_loss(loss: torch.Tensor | float, groups: ProcessGroups) -> torch.Tensor:
    """The logged loss: SP shares summed, then averaged over DP (a detached copy)."""
    value = torch.as_tensor(loss, dtype=torch.float64).detach().clone().to(groups.device)
    if groups.dp_sp is not None:
        dist.all_reduce(value, group=groups.dp_sp)
        value /= groups.dp_size
    return value


def any_rank(flag: bool, groups: ProcessGroups) -> bool:
    """True on every rank if `flag` is True on any rank of the whole world (an all-reduce MAX of one value)."""
    value = torch.tensor([1.0 if flag else 0.0], device=groups.device)
    if groups.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)

