"""megatron-core DistributedDataParallel as the trainer's gradient reduction on GPUs (parallel.ddp_impl).

`parallel.ddp_impl`: `mcore` uses megatron.core.distributed.DistributedDataParallel - every trainable
parameter gets a `main_grad` view into contiguous per-dtype buffers, split into buckets whose all-reduce
over the data x context(=SP)-parallel group starts during backward as soon as a bucket is complete
(`overlap_grad_reduce`); `native` is `data_parallel.allreduce_gradients` (flattened buckets after backward,
any backend); `auto` picks mcore on CUDA and native otherwise.

megatron-core's DDP cannot run on CPU/gloo: it allocates its gradient buffers on
`torch.cuda.current_device()` (tried with megatron-core 0.16.1 on a CPU build: "Torch not compiled with
CUDA enabled" from param_and_grad_buffer), so the CPU lane keeps the native path and the mcore path is
tested on the GPU (tests/gpu/test_mcore_ddp_gpu.py).

How it meets the plain trainer (no wrapper in the forward: the strategy calls `patchify`/`forward_tokens`
on the model, and DDP's gradient hooks sit on the parameters, so they fire either way):
  * `zero_grad()` at the start of each step zeroes the grad buffers (built lazily on the first call, after
    LoRA / activation checkpointing have settled which parameters train);
  * backward accumulates into `main_grad` (the hooks set `.grad` to None);
  * `grad_sync(params)` waits for (or runs) the bucket all-reduces, turns megatron's mean over DP x SP into
    our convention (SP shares summed, DP averaged: x sp_size) and points `.grad` at `main_grad` for the
    clipping and the torch optimizer.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .grid import ProcessGroups

DDPImpl = Literal["mcore", "native"]


def resolve_ddp_impl(impl: str, device_type: str) -> DDPImpl:
    """parallel.ddp_impl -> the implementation used on `device_type` ("cuda" / "cpu")."""
    if impl == "auto":
        return "mcore" if device_type == "cuda" else "native"
    if impl == "mcore" and device_type != "cuda":
        raise ValueError(f"parallel.ddp_impl=mcore on {device_type}: megatron-core's DistributedDataParallel allocates "
                         f"its gradient buffers on the current CUDA device and cannot run on CPU/gloo. Fix: "
                         f"parallel.ddp_impl=auto or native.")
    if impl not in ("mcore", "native"):
        raise ValueError(f"parallel.ddp_impl={impl!r}: unknown. Fix: use auto, mcore or native.")
    return impl  # type: ignore[return-value]


class McoreGradSync:
    """megatron-core DDP over the grid's DP x SP ranks, driven by the trainer's `zero_grad` / `grad_sync` hooks."""

    def __init__(self, model: nn.Module, groups: ProcessGroups, model_cfg, bucket_size: int = 0,
                 overlap_grad_reduce: bool = True, grad_accum: int = 1):
        self.model, self.groups, self.model_cfg = model, groups, model_cfg
        self.bucket_size = bucket_size or None
        # with accumulation the buckets must not reduce after the first micro-batch: reduce once, at the end
        self.overlap = overlap_grad_reduce and grad_accum == 1
        self.ddp = None

    def _build(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer import TransformerConfig

        c, g = self.model_cfg, self.groups
        config = TransformerConfig(num_layers=c.num_layers, hidden_size=c.dim, num_attention_heads=c.num_heads,
                                   ffn_hidden_size=c.ffn_dim, tensor_model_parallel_size=g.tp_size,
                                   context_parallel_size=g.sp_size, params_dtype=next(self.model.parameters()).dtype)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=self.overlap,
                                                   bucket_size=self.bucket_size, average_in_collective=False)
        # the groups come from megatron-core's parallel_state, which init_grid initialised (dp_cp = our dp_sp)
        return DistributedDataParallel(config, ddp_config, self.model)

    def zero_grad(self) -> None:
        if self.ddp is None:
            self.ddp = self._build()
        self.ddp.zero_grad_buffer()
        # grad_sync leaves .grad as a view of main_grad; left in place, the next backward would accumulate into
        # that view and megatron's hook would then add it to main_grad a second time (2x gradients)
        for p in self.model.parameters():
            p.grad = None

    def __call__(self, params: list[torch.Tensor]) -> None:
        assert self.ddp is not None, "McoreGradSync: zero_grad() must run before the first backward of a step"
        self.ddp.finish_grad_sync()
        if self.groups.sp_size > 1:  # megatron averages over dp x cp; SP ranks hold loss shares that sum
            self.ddp.scale_gradients(float(self.groups.sp_size))
        for p in params:
            if p.requires_grad and getattr(p, "main_grad", None) is not None:
                p.grad = p.main_grad if p.main_grad.dtype == p.dtype else p.main_grad.to(p.dtype)
