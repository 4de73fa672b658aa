"""The one seam through which models build their linear layers and QK norms (STYLE.md §2).

Models call `provider.linear(name, in_features, out_features, bias, style)` with the module's full
dotted name ("blocks.3.self_attn.q") and its tensor-parallel style. A provider decides the class:
plain torch, megatron-core column/row parallel, FP8, NVFP4 ... A `KeepListProvider` routes names
matching fnmatch patterns to a high-precision provider, everything else to a low-precision one.
Precision and parallelism therefore never appear inside a model's `forward`.
"""
from __future__ import annotations

import fnmatch
import functools
from typing import Literal, Sequence

import torch
from torch import nn

from .compiled_ops import elementwise
from .save_inputs import save_inputs

# "column": output features may be split (q, k, v, ffn in); "row": input features may be split
# (attention out, ffn out); "replicated": never split (embeddings, head, modulation projections).
ParallelStyle = Literal["column", "row", "replicated"]


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in at least float32 (Wan's WanRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # backward keeps x as given, not its float32 upcast
        return save_inputs(functools.partial(rms_norm_fp32, eps=self.eps), x, self.weight)


@elementwise
def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim in >= float32, cast to x's dtype, times weight (Wan's order)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class LinearProvider:
    """Builds plain `torch.nn.Linear` layers and float32 RMS norms. Subclass to swap implementations."""

    def linear(self, name: str, in_features: int, out_features: int, bias: bool = True,
               style: ParallelStyle = "replicated") -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def qk_norm(self, name: str, dim: int, eps: float, style: ParallelStyle = "column") -> nn.Module:
        """RMS norm over the full (all-heads) q or k vector; a TP provider supplies a sharded one."""
        return RMSNorm(dim, eps)


class KeepListProvider(LinearProvider):
    """Route modules whose name matches `keep` patterns to `high`, all others to `low`."""

    def __init__(self, low: LinearProvider, high: LinearProvider | None = None, keep: Sequence[str] = ()):
        self.low = low
        self.high = high or LinearProvider()
        self.keep = list(keep)

    def kept(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep)

    def linear(self, name, in_features, out_features, bias=True, style="replicated"):
        chosen = self.high if self.kept(name) else self.low
        return chosen.linear(name, in_features, out_features, bias, style)

    def qk_norm(self, name, dim, eps, style="column"):
        return self.low.qk_norm(name, dim, eps, style)
