"""GELU (tanh) fused with the rowwise E4M3 quantization of its output: the FP8 input of the FFN's second linear.

At inference the FP8 FFN runs fc1 -> GELU -> quantize rows -> fc2 on E4M3. Left to Inductor, GELU + row amax +
E4M3 of the 1.3B's [4680, 8960] hidden cost 23 ms per chunk (150 calls, ~0.15 ms each, H100 profile): about what
the FP8 GEMM saves (keeping fc2 in BF16 measured the same speed). This kernel reads fc1's BF16 output once from
DRAM (a row's second pass hits L2) and writes the codes and one scale per row:

    h [M, K] bf16/fp32 -> y = bf16(gelu_tanh(h)) (eager's rounding of the GELU output), then
    scale [M, 1] = amax(|y|) / 448 (1 for an all-zero row), q [M, K] = e4m3_rne(clamp(y * (448 / amax)))

= `fp8.quantize_rowwise(F.gelu(h, approximate="tanh"))` in eager torch, which `gelu_quant_torch` is. The kernel's
tanh is computed from exp, not torch's tanh, so a GELU value can land one BF16 ulp away and its code one E4M3 step
away (rare; measured in tests/unit/test_fp8_gelu_quant.py).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .constants import FP8_E4M3_MAX
from .fp8 import quantize_rowwise
from ..inference.kernels.fp8_window_quant_triton import _to_e4m3
from .fp8_conv.conv_triton import _round_bf16

_MAX = tl.constexpr(FP8_E4M3_MAX)
_C = tl.constexpr(0.7978845608028654)       # sqrt(2 / pi)


@triton.jit
def _gelu_bf16(h):
    u = _C * (h + 0.044715 * h * h * h)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u), saturating to +-1 without NaN at large |u|
    return _round_bf16(0.5 * h * (1.0 + t))


@triton.jit
def _gelu_quant_kernel(h_ptr, q_ptr, s_ptr, K, stride_h, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
                       INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = h_ptr + row * stride_h
    amax = tl.zeros([BLOCK_K], tl.float32)
    for i in range(K_ITERS):               # static trip count (a runtime bound breaks TRITON_INTERPRET on numpy 2)
        k = i * BLOCK_K + tl.arange(0, BLOCK_K)
        y = _gelu_bf16(tl.load(base + k, mask=k < K, other=0.0).to(tl.float32))
        amax = tl.maximum(amax, tl.abs(y))
    a = tl.zeros([1], tl.float32) + tl.max(amax, axis=0)          # [1]: the row's amax
    ok = a > 0
    lim = tl.full([1], _MAX, tl.float32)
    scale = tl.where(ok, tl.math.div_rn(a, lim), 1.0)
    inv = tl.where(ok, tl.math.div_rn(lim, tl.where(ok, a, 1.0)), 1.0)
    tl.store(s_ptr + row + tl.arange(0, 1), scale)
    for i in range(K_ITERS):               # static trip count (a runtime bound breaks TRITON_INTERPRET on numpy 2)
        k = i * BLOCK_K + tl.arange(0, BLOCK_K)
        y = _gelu_bf16(tl.load(base + k, mask=k < K, other=0.0).to(tl.float32))
        v = tl.minimum(tl.maximum(y * inv, -_MAX), _MAX)
        tl.store(q_ptr + row * K + k, _to_e4m3(v, INTERPRET), mask=k < K)


def gelu_quant_torch(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: eager GELU (tanh) in h's dtype, then `quantize_rowwise` -> (E4M3 [M, K], fp32 [M, 1])."""
    return quantize_rowwise(F.gelu(h, approximate="tanh").to(torch.bfloat16))


@torch.library.custom_op("megatron_longlive::gelu_quant_rowwise", mutates_args=())
def gelu_quant_rowwise(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, K] (bf16/fp32, last dim contiguous) -> (E4M3 codes [M, K], fp32 scales [M, 1]) of bf16(gelu(h));
    the Triton kernel on CUDA and under TRITON_INTERPRET=1, `gelu_quant_torch` elsewhere."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (h.is_cuda or interpret):
        return gelu_quant_torch(h)
    if h.dim() != 2 or h.stride(1) != 1:
        raise ValueError(f"gelu_quant_rowwise: h must be [M, K] with a contiguous last dim, got {tuple(h.shape)} "
                         f"strides {h.stride()}")
    m, k = h.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=h.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=h.device)
    if m:
        block = 256 if interpret else 2048
        _gelu_quant_kernel[(m,)](h, q, s, k, h.stride(0), BLOCK_K=block, K_ITERS=triton.cdiv(k, block),
                                 INTERPRET=interpret, num_warps=4)
    return q, s


@gelu_quant_rowwise.register_fake
def _(h):
    return (torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device),
            torch.empty((h.shape[0], 1), dtype=torch.float32, device=h.device))
