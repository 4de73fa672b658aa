"""LoRA on tensor-parallel linears (issue 5), applied from outside like `training/lora.py`: megatron-core's
Column/RowParallelLinear, and the sharded quantized linears (FP8Linear, NVFP4Linear with a `style` and a `tp_group`,
quant/tensor_parallel.py), whose forwards run the same collectives.

For a column-parallel base (output features split, input replicated): lora_A [r, in] is replicated and
lora_B [out/tp, r] is split along its output like the base. The rank-r activation h = A x feeds every
rank's B shard, so its gradient is a sum over ranks: h passes megatron's `copy_to_tensor_model_parallel_region`
(identity forward, all-reduce backward), which makes dA and the LoRA path's dx whole on every rank.

For a row-parallel base (input split, output all-reduced by the base): lora_A [r, in/tp] is split along its
input like the base and lora_B [out, r] is replicated. Each rank's A_r x_r is a partial sum of h = A x; it
is completed by `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward) on the
rank-r activation (r values per token instead of `out`), then B h is the same on every rank.

Sharded LoRA weights carry megatron's `tensor_model_parallel` / `partition_dim` attributes, so the TP code
that already handles the base (full_state_dict / load_full_state_dict, clip_grad_norm_tp, DCP checkpoints)
handles them too; `peft_weights()` gathers the whole A and B (collective), so `save_adapter` writes exactly
the files of a TP=1 run, and `load_peft_weights` (used by `load_adapter`) keeps this rank's part of a file.
The initial weights equal what `LoRALinear` draws at TP=1 from the same RNG state.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..training.lora import LoRALinear, apply_lora
from .tensor_parallel import _mark_sharded


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def tp_base(module: nn.Module) -> tuple[bool, int, int] | None:
    """(column-parallel?, whole in_features, whole out_features) of a tensor-parallel linear, else None."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return isinstance(module, ColumnParallelLinear), module.input_size, module.output_size
    style, group = getattr(module, "style", None), getattr(module, "tp_group", None)
    if style not in ("column", "row") or group is None:
        return None
    tp = dist.get_world_size(group)
    if style == "column":
        return True, module.in_features, module.out_features * tp
    return False, module.in_features * tp, module.out_features


class TPLoRALinear(LoRALinear):
    """A frozen tensor-parallel linear plus a TP-sharded low-rank update (see module docstring)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, group):
        nn.Module.__init__(self)
        shape = tp_base(base_layer)
        if shape is None:
            raise TypeError(f"TPLoRALinear wraps a tensor-parallel linear (megatron-core Column/RowParallelLinear, "
                            f"or FP8Linear / NVFP4Linear with a tp_group), got {type(base_layer).__name__}")
        self.base_layer, self.group = base_layer, group
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.column, self.in_features, self.out_features = shape                          # whole layer
        tp, tp_rank = dist.get_world_size(group), dist.get_rank(group)
        # 1. draw the whole A and B exactly as LoRALinear does at TP=1 (same RNG consumption), on the CPU
        a = nn.Linear(self.in_features, rank, bias=False)
        b = nn.Linear(rank, self.out_features, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        # 2. keep this rank's part: B's output rows (column) or A's input columns (row)
        w = base_layer.weight
        if self.column:
            a_local, b_local = a.weight, b.weight.chunk(tp, dim=0)[tp_rank]
        else:
            a_local, b_local = a.weight.chunk(tp, dim=1)[tp_rank], b.weight
        # (skip_init: no second draw from the RNG, so later layers also draw what they draw at TP=1)
        self.lora_A = nn.utils.skip_init(nn.Linear, a_local.shape[1], rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, b_local.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(a_local)
            self.lora_B.weight.copy_(b_local)
        if self.column:
            _mark_sharded(self.lora_B.weight, 0)
        else:
            _mark_sharded(self.lora_A.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                            reduce_from_tensor_model_parallel_region)

        y = self.base_layer(x)                                    # column: [.., out/tp]; row: [.., out] (reduced)
        h = self.lora_A(x)                                        # [.., r]; row: a partial sum over ranks
        if self.column:
            h = copy_to_tensor_model_parallel_region(h, group=self.group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.group)
        return y + self.lora_B(h) * self.scaling

    @torch.no_grad()
    def load_peft_weights(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Whole (A [r, in], B [out, r]) -> this rank's shard (no communication)."""
        tp, tp_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if self.column:
            b = b.chunk(tp, dim=0)[tp_rank]
        else:
            a = a.chunk(tp, dim=1)[tp_rank]
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)

    def peft_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole (A [r, in], B [out, r]), gathered over the TP group: collective, call on every TP rank."""
        if self.column:
            return self.lora_A.weight.detach(), _gather(self.lora_B.weight, 0, self.group)
        return _gather(self.lora_A.weight, 1, self.group), self.lora_B.weight.detach()


def apply_tp_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, group) -> list[str]:
    """`apply_lora` for a model built by `TPLinearProvider` or `TPQuantProvider`: tensor-parallel targets get
    `TPLoRALinear`, replicated ones the plain `LoRALinear`. Returns the wrapped module names."""

    def wrap(module: nn.Module, r: int, a: float) -> nn.Module:
        if tp_base(module) is not None:
            return TPLoRALinear(module, r, a, group)
        return LoRALinear(module, r, a)

    return apply_lora(model, targets, rank, alpha, wrap=wrap)
