"""Linears that read the same tensor share one channel-recipe input quantization (quant/fp8_shared_input.py).

Tier (b): the shared group equals separate linears bit for bit (outputs, gradients, scale histories) over
bootstrap and delayed steps, under activation checkpointing too, while quantizing x once instead of once per
member; the cache never matches another or a modified tensor and holds nothing once every member has read.
The tiny WanDiT with its self-attention q/k/v and cross-attention k/v wired trains bit for bit as without.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_longlive.quant import fp8_channel
from megatron_longlive.quant.fp8 import FP8Linear
from megatron_longlive.quant.fp8_shared_input import share_input_quantization


class QKV(nn.Module):
    """Three projections of one input, declared as such (the model's `same_input` fact)."""
    same_input = ("q", "k", "v")

    def __init__(self, dim: int = 48):
        super().__init__()
        self.q, self.k, self.v = (FP8Linear.from_linear(nn.Linear(dim, dim), emulate=True, recipe="channel_delayed")
                                  for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x).sigmoid() + self.v(x).square()


def _pair():
    torch.manual_seed(3)
    plain = QKV()
    shared = copy.deepcopy(plain)
    assert share_input_quantization(shared) == 1 and share_input_quantization(plain.q) == 0
    return shared, plain


def _count_quantizations(monkeypatch) -> list:
    calls = []
    real = fp8_channel.quantize_channelwise

    def counting(t, *args, **kwargs):
        calls.append(t.shape)
        return real(t, *args, **kwargs)

    monkeypatch.setattr(fp8_channel, "quantize_channelwise", counting)
    return calls


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_group_equals_separate_linears_and_quantizes_x_once(dtype, ckpt, monkeypatch):
    shared, plain = (m.to(dtype) for m in _pair())
    calls = _count_quantizations(monkeypatch)
    for step, gain in enumerate((1.0, 3.0, 0.5, 1.0)):
        x = (torch.randn(2, 70, 48) * gain).to(dtype)
        outs = []
        for mod in (shared, plain):
            xx = x.clone().requires_grad_()
            mod.zero_grad(set_to_none=True)
            calls.clear()
            y = checkpoint(mod, xx, use_reentrant=False) if ckpt else mod(xx)
            forward_quantizations = len(calls)
            y.backward(torch.ones_like(y))
            outs.append([y.detach(), xx.grad] + [p.grad for p in mod.parameters()]
                        + [lin.x_scale.history.clone() for lin in (mod.q, mod.k, mod.v)]
                        + [lin.dy_scale.history.clone() for lin in (mod.q, mod.k, mod.v)])
            if step:        # past the bootstrap (which quantizes inside backward too): x once shared, 3x separate
                want = 1 if mod is shared else 3
                assert forward_quantizations == want, (mod is shared, forward_quantizations)
                assert len(calls) - forward_quantizations == 3 + (want if ckpt else 0)   # dy each (+ recompute)
        for i, (a, b) in enumerate(zip(*outs)):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, i)
    assert shared.q.x_scale is shared.k.x_scale is shared.v.x_scale and plain.q.x_scale is not plain.k.x_scale
    assert shared.q.x_codes._codes is None                       # nothing held between steps


def test_cache_matches_only_the_same_unmodified_tensor():
    shared, _ = _pair()
    codes = shared.q.x_codes
    x = torch.randn(10, 48)
    shared(x.requires_grad_()).sum().backward()                  # bootstrap the history
    a = x.detach().clone()
    assert codes.quantize(a)[3] and not codes.quantize(a)[3]     # owner, then a reader of its codes
    b = a.clone()                                                # equal values, another tensor: quantized again
    first = codes.quantize(b)
    assert first[3]
    b.mul_(2)                                                    # modified in place: its codes are stale
    again = codes.quantize(b)
    assert again[3] and not torch.equal(again[1].float(), first[1].float())
    codes.quantize(b), codes.quantize(b)                         # the 3 members read: the cache lets go
    assert codes._codes is None and codes._key is None


def test_tiny_wan_shares_qkv_quantization_bit_for_bit():
    """fuse_for_training wires every block's self-attention q/k/v and cross-attention k/v; 3 AdamW steps of the
    tiny model then match an unwired copy exactly."""
    from megatron_longlive.config import QuantConfig, preset_config
    from megatron_longlive.models.wan import WanDiT
    from megatron_longlive.quant.fp8_ffn import fuse_gelu_quant, fuse_for_training
    from megatron_longlive.quant.providers import build_linear_provider

    quant = QuantConfig(linear="fp8", fp8_recipe="channel_delayed")
    torch.manual_seed(0)
    wired = WanDiT(preset_config("tiny"), build_linear_provider(quant))
    wired.init_weights()
    plain = copy.deepcopy(wired)
    fuse_for_training(wired, quant)
    fuse_gelu_quant(plain)
    for blk in wired.blocks:
        assert blk.self_attn.q.x_codes is blk.self_attn.v.x_codes and blk.cross_attn.k.x_codes is blk.cross_attn.v.x_codes
        assert not hasattr(blk.cross_attn.q, "x_codes")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 2, 8, 8, generator=g), torch.rand(1, generator=g) * 1000
    ctx, target = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 2, 8, 8, generator=g)
    losses = []
    for model in (wired, plain):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run = []
        for _ in range(3):
            loss = (model(x, t, ctx) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0], losses
    for a, b in zip(wired.parameters(), plain.parameters()):
        assert torch.equal(a, b)
