"""The FFN (fc1 -> GELU(tanh) -> fc2) with fc2 a frozen FP8Linear, its GELU fused with fc2's input quantization.

`fuse_gelu_quant(model)` swaps every such `nn.Sequential` (the Wan blocks' `ffn`) for `FP8GeluFFN`: the same
children under the same names (state dicts unchanged), and at inference (no grad, fc2 frozen, on CUDA or under
TRITON_INTERPRET=1) one kernel (fp8_gelu_quant_triton) turns fc1's output into fc2's E4M3 operand instead of
Inductor's GELU + row-amax + cast chain. Training and every other case run the plain Sequential.
Applied from outside the model by `freeze_for_inference` (STYLE.md §2).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .fp8 import FP8Linear
from .fp8_gelu_quant_triton import gelu_quant_rowwise


class FP8GeluFFN(nn.Sequential):
    """nn.Sequential(fc1, nn.GELU(approximate="tanh"), fc2: FP8Linear) with the fused inference path."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"     # read once, not inside a compiled forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self[0], self[2]
        if fc2.qweight is None or torch.is_grad_enabled() or not (x.is_cuda or self.interpret):
            return super().forward(x)
        h = fc1(x)
        lead, k = h.shape[:-1], h.shape[-1]
        qh, sh = gelu_quant_rowwise(h.reshape(-1, k))
        return fc2.frozen_gemm(qh, sh).to(x.dtype).view(*lead, -1)


def _is_gelu_fp8_ffn(m: nn.Module) -> bool:
    return (type(m) is nn.Sequential and len(m) == 3 and isinstance(m[1], nn.GELU)
            and m[1].approximate == "tanh" and isinstance(m[2], FP8Linear))


def fuse_gelu_quant(model: nn.Module) -> int:
    """Swap each fc1 -> GELU(tanh) -> FP8Linear Sequential in `model` for FP8GeluFFN; returns how many."""
    found = [(name, m) for name, m in model.named_modules() if _is_gelu_fp8_ffn(m)]
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8GeluFFN(*m))
    return len(found)
