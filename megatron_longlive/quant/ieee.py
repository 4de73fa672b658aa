"""Correctly rounded fp32 division by a constant, the same on every device.

On CUDA, PyTorch computes `tensor / python_float` as tensor * (1 / c), which can land one ulp away from the
IEEE quotient; the Triton kernels divide with div_rn, so a torch reference that must match them bitwise (scales
amax / 448, amax / 2688) divides by a tensor instead.
"""
from __future__ import annotations

import torch


def div_rn(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c, rounded once (x a floating tensor on any device)."""
    return x / torch.full_like(x, c)
