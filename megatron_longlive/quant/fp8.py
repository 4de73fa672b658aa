"""FP8 linear for Hopper: all three GEMMs in E4M3 with rowwise scales through torch._scaled_mm.

Every GEMM is C[M, N] = A[M, K] @ B[N, K]^T with A and B quantized row by row along the reduction dim K:
scale_r = amax(row) / 448 (1 for an all-zero row), q = e4m3_rne(row / scale_r) (torch.float8_e4m3fn cast).

  fprop  y  = x[M,K]     . W[N,K]        dgrad  dx = dy[M,N] . W^T[K,N]      wgrad  dW = dy^T[N,M] . x^T[K,M]

(tokens M are zero-padded to a multiple of 16 for the wgrad, as _scaled_mm needs). `emulate=True`
computes the same math as (q_a * s_a) @ (q_b * s_b)^T in fp32: exact on any device, the oracle of the
scaled-mm path (which accumulates in fp32 on the tensor cores and rounds the output to bf16).
On CUDA the quantization is compiled with torch.compile (amax + scale + cast fused), falling back to eager.
"""
from __future__ import annotations

import warnings

import torch

from .constants import FP8_E4M3_MAX
from .linear_base import QuantLinearBase, bias_grad, pad_tokens


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (float8_e4m3fn [R, C], fp32 scales [R, 1]) with t ~= q * scale."""
    tf = t.float()
    amax = tf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, 1.0)
    return (tf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


_compiled = {}


def _quantizer(device: torch.device):
    """quantize_rowwise, compiled on CUDA when torch.compile works there."""
    if device.type != "cuda":
        return quantize_rowwise
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(quantize_rowwise)   # automatic dynamic shapes after a recompile
    return _compiled["fn"]


def _quantize(t: torch.Tensor):
    fn = _quantizer(t.device)
    if fn is quantize_rowwise:
        return fn(t)
    try:
        return fn(t)
    except Exception as exc:  # pragma: no cover - depends on the GPU toolchain
        warnings.warn(f"torch.compile of the FP8 quantizer failed ({exc}); using eager quantization")
        _compiled["fn"] = quantize_rowwise
        return quantize_rowwise(t)


def use_scaled_mm(device: torch.device) -> bool:
    """True where torch._scaled_mm runs E4M3 GEMMs natively (CUDA sm89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, emulate: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T with both operands E4M3-quantized rowwise along K."""
    qa, sa = _quantize(a.contiguous())       # row-major A; B row-major so qb.t() is column-major
    qb, sb = _quantize(b.contiguous())
    if emulate:
        return (dequantize_rowwise(qa, sa) @ dequantize_rowwise(qb, sb).t()).to(out_dtype)
    out = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
    return out.to(out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, emulate: bool):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        y = fp8_gemm(x2, weight, emulate, torch.float32)                     # [M, N]
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x, weight)
        ctx.emulate, ctx.has_bias = emulate, bias is not None
        return y.to(x.dtype).view(*lead, -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = fp8_gemm(dy2, weight.t(), ctx.emulate, x.dtype).view(x.shape)            # [M, K]
        if ctx.needs_input_grad[1]:
            dw = fp8_gemm(pad_tokens(dy2.t()), pad_tokens(x.reshape(-1, k).t()), ctx.emulate, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = bias_grad(dy2)
        return dx, dw, db, None


class FP8Linear(QuantLinearBase):
    """nn.Linear with E4M3 rowwise-scaled GEMMs. emulate: None = scaled-mm where native (CUDA sm89+)."""

    kind = "FP8 (torch._scaled_mm)"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, emulate: bool | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.emulate = emulate

    @classmethod
    def from_linear(cls, linear, emulate: bool | None = None) -> "FP8Linear":
        """Wrap an existing linear, sharing its parameters."""
        return cls._wrap(linear, emulate=emulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emulate = self.emulate if self.emulate is not None else not use_scaled_mm(x.device)
        return FP8LinearFunction.apply(x, self.weight, self.bias, emulate)
