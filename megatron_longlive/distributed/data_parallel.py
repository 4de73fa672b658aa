"""Gradient reduction over the data x sequence parallel ranks.

Every SP rank computes a *share* of its video's loss (shares sum to the video loss), and every DP rank
a different video, so a replicated parameter's gradient is the SUM over the SP group and the MEAN over
the DP group; TP-sharded parameters reduce over the same (dp x sp) group of ranks holding the same
shard. On CPU/gloo `allreduce_gradients` does this with flattened buckets; on GPU `wrap_megatron_ddp`
uses megatron-core's DistributedDataParallel over the dp x cp group with per-token-loss semantics
(no built-in averaging) followed by a 1/dp scaling.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .grid import ProcessGroups

_BUCKET_BYTES = 64 * 1024 * 1024


def allreduce_gradients(model: nn.Module, groups: ProcessGroups, bucket_bytes: int = _BUCKET_BYTES) -> None:
    """grad <- sum over SP, mean over DP, in place, for every parameter with a gradient."""
    if groups.dp_sp is None:
        return
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for g in grads:
        per_dtype = buckets.setdefault(g.dtype, [[]])
        if sum(x.numel() * x.element_size() for x in per_dtype[-1]) + g.numel() * g.element_size() > bucket_bytes:
            per_dtype.append([])
        per_dtype[-1].append(g)
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


def reduce_loss(loss: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """The logged loss: SP shares summed, then averaged over DP (a detached copy)."""
    value = loss.detach().clone()
    if groups.dp_sp is not None:
        dist.all_reduce(value, group=groups.dp_sp)
        value /= groups.dp_size
    return value


def wrap_megatron_ddp(model: nn.Module, groups: ProcessGroups, grad_reduce_in_fp32: bool = True):
    """GPU path: megatron-core DDP over the dp x cp group. After backward call `finish_grad_sync(ddp)`.

    Needs the model on CUDA. The returned module's `.module` is the original model.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.process_groups_config import ProcessGroupCollection

    cfg = getattr(model, "cfg", None)
    tcfg = TransformerConfig(num_layers=getattr(cfg, "num_layers", 1), hidden_size=getattr(cfg, "dim", 64),
                             num_attention_heads=getattr(cfg, "num_heads", 1),
                             tensor_model_parallel_size=groups.tp_size, context_parallel_size=groups.sp_size)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False, calculate_per_token_loss=True)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return DistributedDataParallel(tcfg, ddp_cfg, model, pg_collection=pgs)


def finish_grad_sync(ddp, groups: ProcessGroups) -> None:
    """Complete megatron DDP's reduction (a sum over dp x cp) and turn the DP sum into a mean."""
    ddp.finish_grad_sync()
    if groups.dp_size > 1:
        ddp.scale_gradients(1.0 / groups.dp_size)
