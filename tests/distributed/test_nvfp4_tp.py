"""Tensor-parallel NVFP4 linears on 2 gloo processes equal the unsharded NVFP4 linear (TP=1).

With the group-shared tensor amax, every shard is quantized bit for bit as its part of the whole tensor;
the remaining differences are fp32 summation order (all-reduce of partial products), hence the tight
tolerances. Stochastic rounding is off (its random bits are drawn per shard).
"""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.distributed.launch import spawn


def _tp_worker(rank, world, style, weight_2d):
    import torch.distributed as dist
    from torch import nn

    from megatron_longlive.quant.nvfp4.linear import NVFP4Linear, NVFP4Recipe, _fake_quant
    from megatron_longlive.quant.providers import NVFP4EmulatedProvider

    dist.init_process_group("gloo")
    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)                                      # the same full tensors on every rank
    full = nn.Linear(64, 32)
    x = torch.randn(3, 9, 64)                                 # 27 tokens: the wgrad pads them
    dy = torch.randn(3, 9, 32)
    recipe = NVFP4Recipe(rht=True, stochastic_rounding=False, weight_2d=weight_2d, rht_seed=5)

    ref = NVFP4Linear.from_linear(full, recipe)               # TP=1 on the full tensors
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(dy)

    shard = NVFP4Linear.shard_of(full, style, group, recipe)
    n, k, r = 32 // world, 64 // world, rank
    cols = slice(r * n, (r + 1) * n)                          # this rank's output features (column)
    ins = slice(r * k, (r + 1) * k)                           # this rank's input features (row)
    xs = (x if style == "column" else x[..., ins]).clone().requires_grad_()
    ys = shard(xs)
    ys.backward(dy[..., cols] if style == "column" else dy)

    # the crux: the shard of W is quantized exactly like that part of the whole W
    w_part = full.weight.detach()[cols] if style == "column" else full.weight.detach()[:, ins]
    w_whole = _fake_quant(full.weight.detach(), block_2d=weight_2d)
    exact = torch.equal(_fake_quant(w_part.contiguous(), block_2d=weight_2d, group=group),
                        w_whole[cols] if style == "column" else w_whole[:, ins])
    if style == "column":
        pairs = {"y": (ys, yr[..., cols]), "dx": (xs.grad, xr.grad), "dW": (shard.weight.grad, ref.weight.grad[cols]),
                 "db": (shard.bias.grad, ref.bias.grad[cols])}
    else:
        pairs = {"y": (ys, yr), "dx": (xs.grad, xr.grad[..., ins]), "dW": (shard.weight.grad, ref.weight.grad[:, ins]),
                 "db": (shard.bias.grad, ref.bias.grad)}
    built = NVFP4EmulatedProvider(tp_group=group).linear("blocks.0.ffn.0", 64, 32, True, style)
    assert (built.in_features, built.out_features, built.style) == ((64, 16) if style == "column" else (32, 32)) + (style,)
    errs = {name: ((a.detach() - b.detach()).abs().max() / b.detach().abs().max()).item()
            for name, (a, b) in pairs.items()}
    return exact, errs


@pytest.mark.distributed
@pytest.mark.parametrize("style", ["column", "row"])
@pytest.mark.parametrize("weight_2d", [True, False])
def test_tp2_nvfp4_linear_equals_tp1(style, weight_2d):
    for exact, errs in spawn(_tp_worker, 2, style, weight_2d):
        assert exact, "a W shard is not quantized like its part of the whole W"
        assert all(e < 1e-5 for e in errs.values()), errs
