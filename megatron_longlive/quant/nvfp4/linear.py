"""NVFP4 training linear: the three GEMMs of the NVFP4 pretraining recipe (arXiv 2509.25149), emulated.

With x [M, K] (tokens x in), W [N, K] master weights (BF16/FP32, kept as they are), dy [M, N]:

  fprop  y  = Q(x) @ Qw(W)^T                   Q: 1x16 blocks along K, nearest rounding
  dgrad  dx = Qg(dy) @ Qw'(W)                  Qg: 1x16 along N, stochastic rounding (if on)
  wgrad  dW = Qg(RHT(dy^T)) @ Q(RHT(x^T))^T    both along the token dim M (zero-padded to 16), RHT if on

Qw is 16x16 2D blocks when `weight_2d` (then fprop and dgrad see the very same quantized W), otherwise
1x16 along K for fprop and 1x16 along N (on W^T) for dgrad. RHT uses one fixed seed on every rank.

Tensor parallel (`style` + `tp_group`): "column" holds W rows [N/tp, K] (input replicated; backward
all-reduces dx), "row" holds W columns [N, K/tp] (input sharded along K; forward all-reduces y before
the bias). Every operand's tensor amax is max-reduced over the group first, so each shard is quantized
exactly as the corresponding part of the unsharded tensor (with 16-aligned shards).
"Emulated": each operand is quantized to NVFP4 exactly (reference.py on CPU, the bitwise-equal Triton
kernels on CUDA), dequantized to fp32 and multiplied in fp32, so the numerics are those of an NVFP4
GEMM with fp32 accumulation on any device. The bias and its gradient stay in fp32.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..linear_base import QuantLinearBase, bias_grad, pad_tokens
from . import reference
from .hadamard import rht, rht_signs


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


def _group_amax(t: torch.Tensor, signs, group) -> torch.Tensor | None:
    """max |RHT?(t)| over all ranks of `group` (None without a group)."""
    if group is None:
        return None
    tf = t.float()
    amax = (rht(tf, signs) if signs is not None else tf).abs().amax()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def _fake_quant(t: torch.Tensor, *, block_2d=False, signs=None, stochastic=False, group=None) -> torch.Tensor:
    """NVFP4 quantize -> dequantize to fp32 of a 2D tensor along its last dim.

    CUDA: Triton kernels, stochastic bits from in-kernel Philox seeded by the (CPU) torch RNG, so no
    [M, K] bit tensor and no host sync. Elsewhere: the reference, with bits from the device RNG.
    group: tensor-parallel group whose shards together form the tensor (shared amax)."""
    amax = _group_amax(t, signs, group)
    if t.is_cuda:
        from .kernels import ops
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if stochastic else None
        return ops.dequantize(*ops.quantize(t, block_2d=block_2d, rht_signs=signs, seed=seed, stochastic=stochastic,
                                            amax=amax))
    rand = reference.random_bits(t.shape, device=t.device) if stochastic else None
    return reference.dequantize(*reference.quantize(t, block_2d=block_2d, rht_signs=signs, rand=rand,
                                                    stochastic=stochastic, amax=amax))


def _weight_fprop_dgrad(weight: torch.Tensor, recipe: NVFP4Recipe, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized W [N, K] for fprop and for dgrad (the same tensor with 2D blocks)."""
    if recipe.weight_2d:
        w = _fake_quant(weight, block_2d=True, group=group)
        return w, w
    return _fake_quant(weight, group=group), _fake_quant(weight.t().contiguous(), group=group).t()


class NVFP4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs on NVFP4-quantized operands (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: NVFP4Recipe,
                style: str = "replicated", group=None):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)                                           # [M, K]
        w_f, _ = _weight_fprop_dgrad(weight, recipe, group)
        y = _fake_quant(x2, group=group) @ w_f.t()                      # [M, N] fp32 (a partial sum for "row")
        if style == "row":
            dist.all_reduce(y, group=group)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.has_bias, ctx.style, ctx.group = recipe, bias is not None, style, group
        return y.to(x.dtype).view(*lead, -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        recipe: NVFP4Recipe = ctx.recipe
        group = ctx.group
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)                                         # [M, N]
        dx = dw = db = None
        sr = recipe.stochastic_rounding
        if ctx.needs_input_grad[0]:
            _, w_d = _weight_fprop_dgrad(weight, recipe, group)
            dx = _fake_quant(dy2, stochastic=sr, group=group) @ w_d    # [M, K] fp32
            if ctx.style == "column":
                dist.all_reduce(dx, group=group)
            dx = dx.to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            signs = rht_signs(recipe.rht_seed, dy.device) if recipe.rht else None
            dy_t = pad_tokens(dy2.t())                                  # [N, M16]
            x_t = pad_tokens(x.reshape(-1, k).t())                      # [K, M16]
            dw = (_fake_quant(dy_t, signs=signs, stochastic=sr, group=group)
                  @ _fake_quant(x_t, signs=signs, group=group).t())
            dw = dw.to(weight.dtype)                                    # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = bias_grad(dy2)
        return dx, dw, db, None, None, None


class NVFP4Linear(QuantLinearBase):
    """nn.Linear whose GEMMs run in emulated NVFP4 (weights stay the high-precision master copy)."""

    kind = "NVFP4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: NVFP4Recipe | None = None,
                 device=None, dtype=None, style: str = "replicated", tp_group=None):
        """in/out_features are this rank's (local) sizes; style "column"/"row" with a `tp_group` makes it
        tensor parallel (module docstring), anything else runs unsharded."""
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe or NVFP4Recipe()
        from ..tensor_parallel import mark_tp_parameters, tp_style

        self.style, self.tp_group = tp_style(style, tp_group)
        mark_tp_parameters(self, self.style)

    @classmethod
    def from_linear(cls, linear, recipe: NVFP4Recipe | None = None, **switches) -> "NVFP4Linear":
        """Wrap an existing linear, sharing its parameters (`switches` override NVFP4Recipe fields)."""
        return cls._wrap(linear, recipe=dataclasses.replace(recipe or NVFP4Recipe(), **switches))

    @classmethod
    def shard_of(cls, linear: nn.Linear, style: str, tp_group, recipe: NVFP4Recipe | None = None) -> "NVFP4Linear":
        """This rank's column ("column": rows of W and b) or row ("row": columns of W, full b) shard of a
        full linear, as a new tensor-parallel NVFP4Linear (copies of the slices)."""
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        w = linear.weight.detach()
        n, k = w.shape
        if style == "column":
            w_local = w[rank * n // tp:(rank + 1) * n // tp]
            b_local = linear.bias.detach()[rank * n // tp:(rank + 1) * n // tp] if linear.bias is not None else None
        elif style == "row":
            w_local = w[:, rank * k // tp:(rank + 1) * k // tp]
            b_local = linear.bias.detach() if linear.bias is not None else None
        else:
            raise ValueError(f"NVFP4Linear.shard_of: style must be 'column' or 'row', got {style!r}")
        new = cls(w_local.shape[1], w_local.shape[0], b_local is not None, recipe, device=w.device, dtype=w.dtype,
                  style=style, tp_group=tp_group)
        with torch.no_grad():
            new.weight.copy_(w_local)
            if b_local is not None:
                new.bias.copy_(b_local)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NVFP4LinearFunction.apply(x, self.weight, self.bias, self.recipe, self.style, self.tp_group)

    def extra_repr(self) -> str:
        r = self.recipe
        return (super().extra_repr() + f", rht={r.rht}, sr={r.stochastic_rounding}, weight_2d={r.weight_2d}"
                + (f", tp={self.style}" if self.tp_group is not None else ""))
