"""3D rotary position embedding of Wan: head_dim split into (time, height, width) parts.

Positions are explicit integers so that a clean chunk and its noisy twin can share temporal
positions (teacher forcing) and streaming can keep counting frames past the cache window.
Angles are computed in float64 (as Wan does) and returned as float64 cos/sin (cast to the activations' >=fp32 dtype when applied) of shape
[S, head_dim // 2]; pairs (2i, 2i+1) of a head vector rotate together.
"""
from __future__ import annotations

import torch

from ..compiled_ops import elementwise


def _inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    # made on the positions' device: a host-to-device copy would break CUDA-graph capture
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))


def grid_positions(frames: int, height: int, width: int, frame_offset: int = 0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Integer (f, h, w) positions of a token grid in raster order (frame-major). Returns [S, 3]."""
    f = torch.arange(frame_offset, frame_offset + frames, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    return torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_cos_sin(positions: torch.Tensor, dims: tuple[int, int, int], theta: float = 10000.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions [S, 3] and per-axis rotary dims -> two [S, sum(dims)//2] float64."""
    angles = [positions[:, axis].to(torch.float64)[:, None] * _inv_freq(d, theta, positions.device)[None, :]
              for axis, d in enumerate(dims)]
    angles = torch.cat(angles, dim=1)
    return torch.cos(angles), torch.sin(angles)


@elementwise
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the last dim. x: [B, S, H, D]; cos/sin: [S, D/2]. Math in float32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos.to(xf.dtype)[None, :, None, :], sin.to(xf.dtype)[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2).type_as(x)
