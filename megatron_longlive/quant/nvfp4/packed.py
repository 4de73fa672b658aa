"""Packed NVFP4 memory mode: frozen base weights stored as NVFP4 and dequantized on the fly.

A `PackedNVFP4Linear` holds, as buffers (so they are frozen and travel in state_dict):
codes uint8 [out, in/2] (two E2M1 codes per byte, low nibble first), scales float8_e4m3fn [out, in/16]
(1x16, 4.5 bits/value in all) or [out/16, in/16] (16x16 tiles), tensor_scale fp32 [], and the bias in
its original dtype. forward(x) = F.linear(x, dequantize(...).to(x.dtype), bias): exactly the forward of
the NVFP4-fake-quantized weight. LoRA adapters (BF16, trainable) go on top of these frozen layers.
The linear is one autograd Function (`_PackedLinearFn`) that saves only the packed buffers (already resident)
and dequantizes again in backward for the input gradient: no dequantized [out, in] weight copy is kept for
backward (a plain F.linear would save it, one per linear of the block being recomputed).

`pack_model` swaps nn.Linear modules (outside a keep-list) for packed ones; `save_packed` /
`load_packed` write and read a safetensors file whose metadata lists the packed modules.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import BLOCK
from . import reference


def _ops(device: torch.device):
    """Quantize/dequantize backend: Triton kernels on CUDA, the reference elsewhere (bitwise equal)."""
    if device.type == "cuda":
        from .kernels import ops
        return ops
    return reference


class _PackedLinearFn(torch.autograd.Function):
    """y = x W^T + b with W = dequantize(codes, scales, tensor_scale).to(dtype), frozen W and b.

    Saves the packed buffers only; backward recomputes W for grad_x = grad_y W (no gradient for W or b)."""

    @staticmethod
    def forward(ctx, x, codes, scales, tensor_scale, bias, dtype):
        w = _ops(codes.device).dequantize(codes, scales, tensor_scale).to(dtype)   # [out, in]
        ctx.save_for_backward(codes, scales, tensor_scale)
        ctx.dtype = dtype
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scales, tensor_scale = ctx.saved_tensors
        w = _ops(codes.device).dequantize(codes, scales, tensor_scale).to(ctx.dtype)
        return grad_out.matmul(w), None, None, None, None, None


class PackedNVFP4Linear(nn.Module):
    """A frozen linear whose weight is stored packed in NVFP4."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_2d: bool = False,
                 bias_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if in_features % BLOCK or (block_2d and out_features % BLOCK):
            raise ValueError(f"PackedNVFP4Linear: {in_features}->{out_features} does not fit {BLOCK}-value blocks; "
                             "keep this layer unpacked (pack_model keep=...)")
        self.in_features, self.out_features, self.block_2d = in_features, out_features, block_2d
        rows = out_features // BLOCK if block_2d else out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(rows, in_features // BLOCK, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("tensor_scale", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block_2d: bool = False) -> "PackedNVFP4Linear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, block_2d,
                  bias_dtype=w.dtype, device=w.device)
        if w.device.type == "meta":  # shapes only (memory accounting): nothing to quantize
            return new
        q = _ops(w.device).quantize(w.detach(), block_2d=block_2d)
        new.codes.copy_(q.packed)
        new.scales.copy_(q.scales)
        new.tensor_scale.copy_(q.tensor_scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] weight; fp32 then cast, i.e. exactly fake_quantize(W).to(dtype)."""
        return _ops(self.codes.device).dequantize(self.codes, self.scales, self.tensor_scale).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dequantized weight in the bias dtype (for code that inspects `.weight`)."""
        return self.dequantized_weight(self.bias.dtype if self.bias is not None else torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast F.linear would run in the autocast dtype: cast explicitly (same values), then run the
        # Function with autocast off so forward and backward use one dtype.
        dev = x.device.type
        has_autocast = torch.amp.is_autocast_available(dev)              # (not on "meta")
        autocast = has_autocast and torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.float16,
                                                                                    torch.bfloat16)
        dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(dev, enabled=False) if has_autocast else contextlib.nullcontext():
            return _PackedLinearFn.apply(x.to(dtype), self.codes, self.scales, self.tensor_scale, bias, dtype)

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.codes, self.scales, self.tensor_scale))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_2d={self.block_2d}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_model(model: nn.Module, keep: Sequence[str] = (), block_2d: bool = False) -> list[str]:
    """Replace every nn.Linear whose name matches no `keep` fnmatch pattern (and whose shape fits the
    blocks) by a PackedNVFP4Linear, in place. Returns the packed module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(fnmatch.fnmatchcase(n, p) for p in keep)
             and m.in_features % BLOCK == 0 and (not block_2d or m.out_features % BLOCK == 0)]
    for name in names:
        _set_module(model, name, PackedNVFP4Linear.from_linear(model.get_submodule(name), block_2d))
    return names


def packed_modules(model: nn.Module) -> Iterable[tuple[str, PackedNVFP4Linear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, PackedNVFP4Linear))


def save_packed(model: nn.Module, path: str) -> None:
    """Write the whole state_dict to safetensors; metadata records the packed modules and their layout."""
    from safetensors.torch import save_file

    layout = {n: {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                  "block_2d": m.block_2d, "bias_dtype": str(m.bias.dtype) if m.bias is not None else None}
              for n, m in packed_modules(model)}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={"format": "megatron_longlive.nvfp4_packed", "packed": json.dumps(layout)})


def load_packed(model: nn.Module, path: str, strict: bool = True) -> list[str]:
    """Load a `save_packed` file into an unpacked (or packed) model of the same architecture: the listed
    modules become PackedNVFP4Linear first (no quantization is run), then the state is loaded."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "megatron_longlive.nvfp4_packed":
        raise ValueError(f"{path}: not a packed NVFP4 file (metadata format={meta.get('format')!r}); "
                         "write it with quant.nvfp4.packed.save_packed")
    layout = json.loads(meta["packed"])
    for name, spec in layout.items():
        old = model.get_submodule(name)
        if not isinstance(old, PackedNVFP4Linear):
            device = next(iter(old.parameters()), torch.empty(0)).device
            bias_dtype = getattr(torch, spec["bias_dtype"].split(".")[-1]) if spec["bias_dtype"] else torch.bfloat16
            _set_module(model, name, PackedNVFP4Linear(spec["in"], spec["out"], spec["bias"], spec["block_2d"],
                                                       bias_dtype, device))
    state = load_file(path, device=str(next(iter(model.state_dict().values())).device))
    model.load_state_dict(state, strict=strict)
    return list(layout)
