"""Parallel layout: world = TP x SP x DP (SP runs on megatron-core's context-parallel group)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .base import ConfigBase


@dataclasses.dataclass
class ParallelConfig(ConfigBase):
    """Degrees of parallelism. DP is whatever is left of the world size."""

    _section: ClassVar[str] = "parallel"

    tp_size: int = 1
    """Tensor-parallel degree (column/row-parallel linears: megatron-core's in bf16, sharded FP8 / NVFP4 ones
    with quant.linear=fp8 / nvfp4_emulated). Must divide num_heads."""
    sp_size: int = 1
    """Sequence-parallel degree (Ulysses over the context-parallel group). Must divide num_heads."""
    sp_layout: Literal["balanced", "naive"] = "balanced"
    """`balanced`: each rank holds the clean and noisy tokens of the same chunks; `naive`: contiguous split."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; `auto` picks nccl with CUDA, gloo otherwise."""
    vae_halo_frames: int = -1
    """Left halo (pixel frames) for SP-chunked VAE encoding; -1 = the measured receptive field."""
    ddp_impl: Literal["auto", "mcore", "native"] = "auto"
    """Gradient reduction over DP x SP: `mcore` = megatron-core DistributedDataParallel (contiguous bucketed grad
    buffers, reduction overlapped with backward; CUDA only), `native` = our bucketed all-reduce after backward (any
    backend); `auto` = mcore on CUDA, native otherwise."""
    ddp_bucket_size: int = 0
    """mcore DDP bucket size in elements; 0 = megatron-core's default (max(4e7, 1e6 * dp_size))."""
    ddp_overlap_grad_reduce: bool = True
    """mcore DDP: launch each bucket's all-reduce as soon as its gradients are ready during backward (used only with
    train.grad_accum=1; with accumulation the reduction runs after the last micro-batch)."""

    def validate(self) -> None:
        for name in ("tp_size", "sp_size"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set parallel.{name} to 1 or more")
        if self.ddp_bucket_size < 0:
            raise self.error("ddp_bucket_size", f"must be >= 0, got {self.ddp_bucket_size}",
                             "use 0 (megatron-core's default) or a size in elements")
