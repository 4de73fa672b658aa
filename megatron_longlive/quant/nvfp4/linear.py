"""NVFP4 training linear: the three GEMMs of the NVFP4 pretraining recipe (arXiv 2509.25149), emulated.

With x [M, K] (tokens x in), W [N, K] master weights (BF16/FP32, kept as they are), dy [M, N]:

  fprop  y  = Q(x) @ Qw(W)^T                   Q: 1x16 blocks along K, nearest rounding
  dgrad  dx = Qg(dy) @ Qw'(W)                  Qg: 1x16 along N, stochastic rounding (if on)
  wgrad  dW = Qg(RHT(dy^T)) @ Q(RHT(x^T))^T    both along the token dim M (zero-padded to 16), RHT if on

Qw is 16x16 2D blocks when `weight_2d` (then fprop and dgrad see the very same quantized W), otherwise
1x16 along K for fprop and 1x16 along N (on W^T) for dgrad. RHT uses one fixed seed on every rank.
"Emulated": each operand is quantized to NVFP4 exactly (reference.py on CPU, the bitwise-equal Triton
kernels on CUDA), dequantized to fp32 and multiplied in fp32, so the numerics are those of an NVFP4
GEMM with fp32 accumulation on any device. The bias and its gradient stay in fp32.
"""
from __future__ import annotations

import dataclasses

import torch

from ..linear_base import QuantLinearBase, bias_grad, pad_tokens
from . import reference
from .hadamard import rht_signs


@dataclasses.dataclass(frozen=True)
class NVFP4Recipe:
    """Switches of the recipe (QuantConfig.rht / stochastic_rounding / weight_2d)."""

    rht: bool = True
    """Random Hadamard transform on both inputs of the weight-gradient GEMM."""
    stochastic_rounding: bool = True
    """Stochastic rounding of the output gradient (dgrad and wgrad operands)."""
    weight_2d: bool = True
    """16x16 weight blocks (same quantized W in fprop and dgrad)."""
    rht_seed: int = 0
    """Seed of the RHT signs; identical on every rank."""


def _fake_quant(t: torch.Tensor, *, block_2d=False, signs=None, stochastic=False) -> torch.Tensor:
    """NVFP4 quantize -> dequantize to fp32 of a 2D tensor along its last dim.

    CUDA: Triton kernels, stochastic bits from in-kernel Philox seeded by the (CPU) torch RNG, so no
    [M, K] bit tensor and no host sync. Elsewhere: the reference, with bits from the device RNG."""
    if t.is_cuda:
        from .kernels import ops
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if stochastic else None
        return ops.dequantize(*ops.quantize(t, block_2d=block_2d, rht_signs=signs, seed=seed, stochastic=stochastic))
    rand = reference.random_bits(t.shape, device=t.device) if stochastic else None
    return reference.dequantize(*reference.quantize(t, block_2d=block_2d, rht_signs=signs, rand=rand,
                                                    stochastic=stochastic))


def _weight_fprop_dgrad(weight: torch.Tensor, recipe: NVFP4Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized W [N, K] for fprop and for dgrad (the same tensor with 2D blocks)."""
    if recipe.weight_2d:
        w = _fake_quant(weight, block_2d=True)
        return w, w
    return _fake_quant(weight), _fake_quant(weight.t().contiguous()).t()


class NVFP4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs on NVFP4-quantized operands (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: NVFP4Recipe):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)                                           # [M, K]
        w_f, _ = _weight_fprop_dgrad(weight, recipe)
        y = _fake_quant(x2) @ w_f.t()                                   # [M, N] fp32
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.has_bias = recipe, bias is not None
        return y.to(x.dtype).view(*lead, -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        recipe: NVFP4Recipe = ctx.recipe
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)                                         # [M, N]
        dx = dw = db = None
        sr = recipe.stochastic_rounding
        if ctx.needs_input_grad[0]:
            _, w_d = _weight_fprop_dgrad(weight, recipe)
            dx = (_fake_quant(dy2, stochastic=sr) @ w_d).to(x.dtype).view(x.shape)   # [M, K]
        if ctx.needs_input_grad[1]:
            signs = rht_signs(recipe.rht_seed, dy.device) if recipe.rht else None
            dy_t = pad_tokens(dy2.t())                                 # [N, M16]
            x_t = pad_tokens(x.reshape(-1, k).t())                     # [K, M16]
            dw = _fake_quant(dy_t, signs=signs, stochastic=sr) @ _fake_quant(x_t, signs=signs).t()
            dw = dw.to(weight.dtype)                                    # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = bias_grad(dy2)
        return dx, dw, db, None


class NVFP4Linear(QuantLinearBase):
    """nn.Linear whose GEMMs run in emulated NVFP4 (weights stay the high-precision master copy)."""

    kind = "NVFP4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: NVFP4Recipe | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe or NVFP4Recipe()

    @classmethod
    def from_linear(cls, linear, recipe: NVFP4Recipe | None = None, **switches) -> "NVFP4Linear":
        """Wrap an existing linear, sharing its parameters (`switches` override NVFP4Recipe fields)."""
        return cls._wrap(linear, recipe=dataclasses.replace(recipe or NVFP4Recipe(), **switches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NVFP4LinearFunction.apply(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        r = self.recipe
        return super().extra_repr() + f", rht={r.rht}, sr={r.stochastic_rounding}, weight_2d={r.weight_2d}"
