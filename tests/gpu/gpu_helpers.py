"""Shared pieces of the GPU lane: byte-level comparison messages and the tiny random DiT built on CUDA."""
from __future__ import annotations

import torch


def bytes_differ(got: torch.Tensor, want: torch.Tensor) -> str:
    """'k of n bytes differ' between two tensors of the same shape and dtype (compared on the CPU)."""
    a = got.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
    b = want.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
    assert a.shape == b.shape
    return f"{int((a != b).sum())} of {a.numel()} bytes differ"


def tiny_cuda_dit():
    """The tiny preset's WanDiT on CUDA in eval mode, seeded, TF32 off, with a non-zero head (Wan's init zeroes it)."""
    from megatron_longlive.config import preset_config
    from megatron_longlive.models.wan import WanDiT

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = WanDiT(preset_config("tiny"))
        m.init_weights()
        torch.nn.init.normal_(m.head.head.weight, std=0.02)
    return m.eval()
