"""Tensor parallelism through the provider seam: megatron-core column/row-parallel linears.

`TPLinearProvider` builds megatron-core `ColumnParallelLinear` for "column" layers (q, k, v, ffn.0:
output features split, heads local) and `RowParallelLinear` for "row" layers (attention o, ffn.2:
input split, output all-reduced); "replicated" layers stay `nn.Linear`. The subclasses return only
the output tensor (megatron returns `(out, bias)`) and keep the plain parameter names
(`q.weight`, `q.bias`), so state dicts shard/unshard by name with `full_state_dict` /
`load_full_state_dict` (megatron's `partition_dim` attribute says how).

Wan normalises q and k over ALL heads (RMS over the full `dim`), but under TP a rank holds only
`dim/tp` features; `TPRMSNorm` all-reduces the sum of squares over the TP group (autograd-correct:
the backward all-reduces too), with its weight sharded like the features.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.provider import KeepListProvider, LinearProvider


def _megatron_config(tp_size: int, params_dtype: torch.dtype, use_cpu_initialization: bool, initialize: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # Only the fields ColumnParallelLinear/RowParallelLinear read; sequence_parallel (megatron's
    # activation sharding inside TP) stays off: our SP is Ulysses over the CP group.
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, params_dtype=params_dtype,
                               use_cpu_initialization=use_cpu_initialization, perform_initialization=initialize,
                               gradient_accumulation_fusion=False, sequence_parallel=False)


def _xavier(weight: torch.Tensor) -> None:
    nn.init.xavier_uniform_(weight)


def _mark_sharded(weight: torch.Tensor, dim: int) -> None:
    """megatron sets `partition_dim` only when it initialises the weight; set it when it did not."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if not hasattr(weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(weight, True, dim, 1)


class _PlainOutput:
    """Mixin for megatron's parallel linears: return just the output tensor (megatron returns (out, bias)),
    no `_extra_state` in state dicts, and `partition_dim` set even when megatron did not initialise."""

    shard_dim = 0
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _mark_sharded(self.weight, self.shard_dim)

    def forward(self, x):
        return super().forward(x)[0]


def _mp_layers():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(_PlainOutput, ColumnParallelLinear):
        """Output features split over TP (local heads); input replicated."""

        shard_dim = 0

    class RowLinear(_PlainOutput, RowParallelLinear):
        """Input features split over TP (input already parallel); output all-reduced."""

        shard_dim = 1

    return ColumnLinear, RowLinear


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x on every rank; dL/dx_r = Σ_ranks dL/dy (each rank's y feeds different shards)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TPRMSNorm(nn.Module):
    """RMS norm over the full (all-TP-ranks) feature dim of a column-sharded tensor, in >= float32."""

    def __init__(self, dim: int, eps: float, group, tp_size: int):
        super().__init__()
        if dim % tp_size:
            raise ValueError(f"TPRMSNorm: dim={dim} not divisible by tp_size={tp_size}")
        self.full_dim, self.eps, self.group = dim, eps, group
        self.weight = nn.Parameter(torch.ones(dim // tp_size))
        _mark_sharded(self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        sum_sq = _AllReduceSum.apply(xf.pow(2).sum(-1, keepdim=True), self.group)
        return (xf * torch.rsqrt(sum_sq / self.full_dim + self.eps)).type_as(x) * self.weight


class TPLinearProvider(LinearProvider):
    """Column/row-parallel megatron-core linears over `group` (tp_size ranks); replicated ones plain."""

    def __init__(self, group, tp_size: int, params_dtype: torch.dtype = torch.float32,
                 use_cpu_initialization: bool | None = None, initialize: bool = True):
        """initialize=False leaves the weights empty (they are loaded next, e.g. by `load_full_state_dict`)."""
        if use_cpu_initialization is None:
            use_cpu_initialization = not torch.cuda.is_available()
        self.group, self.tp_size = group, tp_size
        self.config = _megatron_config(tp_size, params_dtype, use_cpu_initialization, initialize)
        self._column, self._row = _mp_layers()

    def linear(self, name, in_features, out_features, bias=True, style="replicated"):
        if style == "column":
            return self._column(in_features, out_features, config=self.config, init_method=_xavier, bias=bias,
                                gather_output=False, tp_group=self.group)
        if style == "row":
            return self._row(in_features, out_features, config=self.config, init_method=_xavier, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=self.group)
        return super().linear(name, in_features, out_features, bias, style)

    def qk_norm(self, name, dim, eps, style="column"):
        return TPRMSNorm(dim, eps, self.group, self.tp_size)


class TPQuantProvider(KeepListProvider):
    """Low-precision (fp8, nvfp4_emulated) column/row linears sharded over the TP group; layers kept in high
    precision (`quant.keep_high_precision`) from megatron-core's TP linears; the TP q/k norms."""

    def __init__(self, quant_cfg, group, tp_size: int, **tp_options):
        from ..quant.providers import build_linear_provider

        quantized = build_linear_provider(quant_cfg, tp_group=group)
        super().__init__(quantized.low, TPLinearProvider(group, tp_size, **tp_options), quant_cfg.keep_high_precision)

    def qk_norm(self, name, dim, eps, style="column"):
        return self.high.qk_norm(name, dim, eps, style)


def _sharded_dim(param: torch.Tensor) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def full_state_dict(model: nn.Module, group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients) gathered over the TP group into full tensors, by plain name."""
    out = {}
    size = dist.get_world_size(group) if group is not None else 1
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach()
        dim = _sharded_dim(p)
        if dim is not None and size > 1:
            parts = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=dim)
        out[name] = t.clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Copy full tensors into a (possibly TP-sharded) model: each rank takes its slice along partition_dim."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise KeyError(f"load_full_state_dict: missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, p in params.items():
        t = state[name]
        dim = _sharded_dim(p)
        if dim is not None and tp_size > 1:
            t = t.chunk(tp_size, dim=dim)[tp_rank]
        if t.shape != p.shape:
            raise ValueError(f"load_full_state_dict: {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(p.shape)} (tp_rank {tp_rank} of {tp_size})")
        p.copy_(t)


def clip_grad_norm_tp(params: list[torch.Tensor], max_norm: float, group) -> torch.Tensor:
    """Clip gradients by the norm of the FULL model: TP-sharded grads' squares summed over `group`,
    replicated grads (identical on every TP rank) counted once. Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum((p.grad.float().pow(2).sum() for p in params
                   if p.grad is not None and _sharded_dim(p) is not None), torch.zeros((), device=grads[0].device))
    replicated = sum((p.grad.float().pow(2).sum() for p in params
                      if p.grad is not None and _sharded_dim(p) is None), torch.zeros((), device=grads[0].device))
    if group is not None:
        dist.all_reduce(sharded, group=group)
    total = (sharded + replicated).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
