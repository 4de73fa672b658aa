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
    """Tensor-parallel degree (megatron-core column/row-parallel linears). Must divide num_heads."""
    sp_size: int = 1
    """Sequence-parallel degree (Ulysses over the context-parallel group). Must divide num_heads."""
    sp_layout: Literal["balanced", "naive"] = "balanced"
    """`balanced`: each rank holds the clean and noisy tokens of the same chunks; `naive`: contiguous split."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; `auto` picks nccl with CUDA, gloo otherwise."""
    vae_halo_frames: int = -1
    """Left halo (pixel frames) for SP-chunked VAE encoding; -1 = the measured receptive field."""

    def validate(self) -> None:
        for name in ("tp_size", "sp_size"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set parallel.{name} to 1 or more")
