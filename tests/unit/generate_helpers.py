"""Shared by the `longlive generate` CLI tests: a short streaming setting and seeded tiny weights."""
from __future__ import annotations

import torch

from megatron_longlive.models.wan import WanDiT

# A 32x32, 1-frame-chunk, 2-step stream: fast on CPU, still exercises sink + window.
GEN = ["--set", "infer.num_chunks=3", "--set", "infer.chunk_frames=1", "--set", "infer.window_frames=3",
       "--set", "infer.sink_frames=1", "--set", "infer.height=32", "--set", "infer.width=32",
       "--set", "infer.denoising_steps=[1000,500]", "--prompt", "a red square slides right@0", "--no-progress"]


def tiny_dit(cfg, head_std: float = 0.05, seed: int = 0) -> WanDiT:
    """Wan's init with a non-zero head (a zero head makes every sampler return its input noise)."""
    torch.manual_seed(seed)
    model = WanDiT(cfg)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=head_std)
    return model
