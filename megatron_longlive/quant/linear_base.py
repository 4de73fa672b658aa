"""What the quantized linears (FP8Linear, NVFP4Linear) share: shape checks, parameter sharing, token padding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .constants import BLOCK


def pad_tokens(t: torch.Tensor, multiple: int = BLOCK) -> torch.Tensor:
    """[R, M] -> [R, ceil(M/multiple)*multiple] with zeros: the wgrad reduces over tokens, and zeros add nothing."""
    pad = (-t.shape[-1]) % multiple
    return F.pad(t, (0, pad)) if pad else t


def bias_grad(dy2: torch.Tensor) -> torch.Tensor:
    """db = sum over tokens of dy [M, N], accumulated in fp32."""
    return dy2.float().sum(0).to(dy2.dtype)


class QuantLinearBase(nn.Linear):
    """nn.Linear whose features must be multiples of 16; `_wrap` shares an existing linear's parameters
    (the high-precision master weights stay the ones the optimizer holds)."""

    kind = "quantized linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        if in_features % BLOCK or out_features % BLOCK:
            raise ValueError(f"{type(self).__name__}: in_features={in_features} and out_features={out_features} "
                             f"must be multiples of {BLOCK} for {self.kind} GEMMs; keep this layer in high precision "
                             "(quant.keep_high_precision)")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)

    @classmethod
    def _wrap(cls, linear: nn.Linear, **kwargs):
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        new.weight, new.bias = linear.weight, linear.bias
        return new
