"""Generic application of a model's sequence-parallel plan (STYLE.md §1: the plan is data next to the model).

An `SPPlan` names (a) the attention cores to wrap with Ulysses (fnmatch patterns over module names),
(b) the inputs of the model's token-level forward that are split over SP ranks and along which dim /
in which unit (token or frame), (c) the inputs that stay replicated (text), (d) the outputs and how
they are gathered, and (e) the modules whose outputs are replicated but whose gradients arrive as per-rank
partial sums (the cross-attention K/V of the text: each rank's queries contribute their share). `apply_sp_plan`
swaps the cores and averages (e)'s output gradients over SP from outside, so those modules' backwards see one
whole gradient, the same on every rank: required for quantized linears (an FP8 or NVFP4 gradient quantization
of partial sums is not the quantization of their sum), exact either way in BF16; `shard_input` / `gather_output` do the
data movement for any layout given as token indices (`balanced_sp.local_token_index`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from .ulysses import UlyssesAttention


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """An input or output sharded over SP ranks along `dim`, indexed per `unit` ("token" or "frame")."""

    dim: int
    unit: Literal["token", "frame"] = "token"


@dataclasses.dataclass(frozen=True)
class SPPlan:
    ulysses_cores: tuple[str, ...]
    """Module-name patterns of self-attention cores wrapped by `UlyssesAttention`."""
    split_inputs: dict[str, SplitSpec]
    """Inputs of the token-level forward that each rank holds only its share of."""
    replicated_inputs: tuple[str, ...]
    """Inputs every SP rank holds in full (text tokens, their K/V)."""
    outputs: dict[str, SplitSpec]
    """Outputs left sharded like the inputs; `gather_output` assembles them when needed."""
    replicated_grads: tuple[str, ...] = ()
    """Module-name patterns of modules computed alike on every SP rank (replicated inputs) whose output gradient
    is a per-rank partial sum: averaged over SP before their backward (the SP gradient sum restores the whole)."""


class _MeanGradOverGroup(torch.autograd.Function):
    """Identity forward; backward: the gradient averaged over `group` (every rank then back-propagates the same
    1/size share of the whole gradient, and the parameter-gradient sum over SP restores it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)      # all_reduce works in place
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def apply_sp_plan(model: nn.Module, plan: SPPlan, group) -> list[str]:
    """Wrap every module matching `plan.ulysses_cores` with Ulysses over `group`; return the wrapped names.

    With `group=None` (SP=1) the model is left as is.
    """
    if group is None or dist.get_world_size(group) == 1:
        return []
    targets = [name for name, _ in model.named_modules()
               if any(fnmatch.fnmatchcase(name, p) for p in plan.ulysses_cores)]
    if not targets:
        raise ValueError(f"SP plan: no module matches {plan.ulysses_cores}; the plan does not fit this model.")
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        core = getattr(parent, attr)
        if not isinstance(core, UlyssesAttention):
            setattr(parent, attr, UlyssesAttention(core, group))
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in plan.replicated_grads) and not hasattr(module, "_sp_mean_grad"):
            module._sp_mean_grad = module.register_forward_hook(     # a training-only op (inference: nothing)
                lambda _m, _args, out: _MeanGradOverGroup.apply(out, group) if torch.is_grad_enabled() else out)
    return targets


def _unit_index(spec: SplitSpec, token_index: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    if spec.unit == "token":
        return token_index
    return token_index[::tokens_per_frame] // tokens_per_frame


def shard_input(plan: SPPlan, name: str, value: torch.Tensor, token_index: torch.Tensor,
                tokens_per_frame: int) -> torch.Tensor:
    """This rank's share of a full input: `value` indexed along the plan's dim by the rank's tokens/frames."""
    if name in plan.replicated_inputs:
        return value
    spec = plan.split_inputs[name]
    index = _unit_index(spec, token_index, tokens_per_frame).to(value.device)
    return value.index_select(spec.dim, index)


def gather_output(plan: SPPlan, name: str, local: torch.Tensor, gathered_index: torch.Tensor, group) -> torch.Tensor:
    """All-gather a sharded output and put it back into global order (inverse of the gathered permutation).

    `gathered_index`: the global token index of every gathered position (`balanced_sp.gathered_order`).
    Not differentiable (evaluation / inference use).
    """
    spec = plan.outputs[name]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    gathered = torch.cat(parts, dim=spec.dim)
    inverse = torch.empty_like(gathered_index)
    inverse[gathered_index] = torch.arange(gathered_index.numel())
    return gathered.index_select(spec.dim, inverse.to(gathered.device))
