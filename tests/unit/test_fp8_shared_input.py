"""Linears that read the same tensor run as one channel-recipe FP8 linear (quant/fp8_shared_input.py).

Tier (b): against separate channel linears (each its own histories) over bootstrap and delayed steps, under
activation checkpointing too: outputs, weight and bias gradients and every scale history are equal bit for bit;
the input gradient (summed in one GEMM) is as close to float64 math as the separate linears' is. A pass runs 3
GEMMs instead of 9 and quantizes x once instead of 3 times. An unused member gets no gradient and keeps its
history; the group's outputs match only the same unmodified tensor, and nothing is held once every member has
read. The tiny WanDiT with its q/k/v and cross-attention k/v wired trains as the unwired one does.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_longlive.quant import fp8_channel, fp8_shared_input
from megatron_longlive.quant.fp8 import FP8Linear
from megatron_longlive.quant.fp8_shared_input import share_input_quantization


class QKV(nn.Module):
    """Three projections of one input, declared as such (the model's `same_input` fact)."""
    same_input = ("q", "k", "v")

    def __init__(self, dim: int = 48, use_q: bool = True):
        super().__init__()
        self.use_q = use_q
        self.q, self.k, self.v = (FP8Linear.from_linear(nn.Linear(dim, dim), emulate=True, recipe="channel_delayed")
                                  for _ in range(3))

    def forward(self, x):
        # the group's outputs are column slices of one GEMM output; torch's CPU sigmoid rounds a strided input
        # differently from a contiguous one (AVX-512), so the consumer reads contiguous copies: the claim under
        # test is the linears', not the elementwise kernels'
        kv = self.k(x).contiguous().sigmoid() + self.v(x).contiguous().square()
        return self.q(x).contiguous() * kv if self.use_q else kv


def _pair(use_q: bool = True):
    torch.manual_seed(3)
    plain = QKV(use_q=use_q)
    fused = copy.deepcopy(plain)
    assert share_input_quantization(fused) == 1 and share_input_quantization(plain.q) == 0
    return fused, plain


def _count(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def _exact_dx(mod: QKV, x: torch.Tensor) -> torch.Tensor:
    """d sum(forward) / dx in float64 with the module's (BF16 or fp32) weights: the unquantized truth."""
    xx = x.double().requires_grad_()
    lin = lambda m: xx @ m.weight.detach().double().t() + m.bias.detach().double()  # noqa: E731
    kv = lin(mod.k).sigmoid() + lin(mod.v).square()
    (lin(mod.q) * kv if mod.use_q else kv).sum().backward()
    return xx.grad


def _rel(a, ref) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_equals_separate_linears_up_to_dx_rounding_with_a_third_of_the_gemms(dtype, ckpt, monkeypatch):
    fused, plain = (m.to(dtype) for m in _pair())
    quantizations = _count(monkeypatch, fp8_channel, "quantize_channelwise")
    gemms = _count(monkeypatch, fp8_channel, "fp8_gemm")
    monkeypatch.setattr(fp8_shared_input, "quantize_channelwise", fp8_channel.quantize_channelwise)
    for step, gain in enumerate((1.0, 3.0, 0.5, 1.0)):
        x = (torch.randn(2, 70, 48) * gain).to(dtype)
        outs, counts = [], []
        for mod in (fused, plain):
            xx = x.clone().requires_grad_()
            mod.zero_grad(set_to_none=True)
            quantizations.clear(), gemms.clear()
            y = checkpoint(mod, xx, use_reentrant=False) if ckpt else mod(xx)
            forward_quantizations, forward_gemms = len(quantizations), len(gemms)
            y.backward(torch.ones_like(y))
            counts.append((forward_quantizations, forward_gemms, len(gemms) - forward_gemms))
            outs.append([y.detach()] + [p.grad for p in mod.parameters()]
                        + [lin.dy_scale.history.clone() for lin in (mod.q, mod.k, mod.v)]
                        + [mod.q.x_scale.history.clone(), xx.grad])
        *same_f, dx_f = outs[0]
        *same_p, dx_p = outs[1]
        for i, (a, b) in enumerate(zip(same_f, same_p)):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, i)
        exact = _exact_dx(fused, x)
        err_f, err_p = _rel(dx_f, exact), _rel(dx_p, exact)
        assert err_f <= 1.05 * err_p + 1e-6, (step, err_f, err_p)            # E4M3's error, not a new one
        if gain == 1.0:     # E4M3 operands: ~4% (the step after gain 1 -> 3 saturates, separate linears too)
            assert err_f < 0.06, (step, err_f)
        if step:            # past the bootstrap (which quantizes inside backward): x once, 1 GEMM per pass
            recompute = 2 if ckpt else 1
            assert counts[0] == (1, 1, 2 + (recompute - 1)), counts
            assert counts[1] == (3, 3, 6 + 3 * (recompute - 1)), counts
    assert fused.q.x_scale is fused.k.x_scale is fused.v.x_scale and plain.q.x_scale is not plain.k.x_scale
    assert fused.q.same_input_group._outs is None                       # nothing held between steps


def test_unused_member_gets_no_gradient_and_its_history_does_not_roll():
    fused, plain = _pair(use_q=False)
    for step in range(3):
        x = torch.randn(3, 40, 48)
        grads = []
        for mod in (fused, plain):
            mod.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            mod(xx).sum().backward()
            grads.append([mod.k.weight.grad, mod.k.bias.grad, mod.v.weight.grad, mod.v.bias.grad,
                          mod.k.dy_scale.history, mod.v.dy_scale.history])
        assert fused.q.weight.grad is None and fused.q.bias.grad is None
        assert not fused.q.dy_scale.ready                                  # never bootstrapped, never rolled
        for a, b in zip(*grads):
            assert torch.equal(a, b), step


def test_a_wired_module_copies_without_its_cached_outputs():
    fused, _ = _pair(use_q=False)
    fused(torch.randn(5, 48, requires_grad=True)).sum().backward()        # q's output is left in the cache
    assert fused.q.same_input_group._outs is not None
    before = fused.k.weight.grad.clone()
    twin = copy.deepcopy(fused)
    group = twin.q.same_input_group
    assert group is twin.v.same_input_group and group.members == [twin.q, twin.k, twin.v] and group._outs is None
    assert group.x_scale is twin.k.x_scale and group.x_scale is not fused.q.x_scale
    x = torch.randn(5, 48, requires_grad=True)
    twin(x).sum().backward()
    assert x.grad is not None and twin.k.weight.grad is not None
    assert torch.equal(fused.k.weight.grad, before)          # the copy's backward left the original's alone


def test_outputs_match_only_the_same_unmodified_tensor_and_are_let_go():
    fused, _ = _pair()
    group = fused.q.same_input_group
    fused(torch.randn(10, 48).requires_grad_()).sum().backward()           # bootstrap the histories
    a = torch.randn(10, 48, requires_grad=True)
    qa, ka = fused.q(a), fused.k(a)
    assert ka.grad_fn is qa.grad_fn                                         # k's output came from q's GEMM
    assert fused.q(a).grad_fn is not qa.grad_fn                             # q again: the group runs again
    b = a.detach().clone().requires_grad_()                                 # equal values, another tensor
    assert fused.v(b).grad_fn is not qa.grad_fn
    c = torch.randn(10, 48)
    qc = fused.q(c)
    c.mul_(2)                                                               # modified in place: stale
    kc = fused.k(c)
    assert kc.grad_fn is not qc.grad_fn
    fused.q(c), fused.v(c)                                                  # k, q and v took theirs
    assert group._outs is None and group._key is None


def test_tiny_wan_fused_projections_train_as_separate_linears():
    """fuse_for_training wires every block's self-attention q/k/v and cross-attention k/v; 3 AdamW steps of the
    tiny model then follow an unwired copy (same losses to FP8 rounding of dx)."""
    from megatron_longlive.config import QuantConfig, preset_config
    from megatron_longlive.models.wan import WanDiT
    from megatron_longlive.quant.fp8_ffn import fuse_for_training, fuse_gelu_quant
    from megatron_longlive.quant.providers import build_linear_provider

    quant = QuantConfig(linear="fp8", fp8_recipe="channel_delayed")
    torch.manual_seed(0)
    wired = WanDiT(preset_config("tiny"), build_linear_provider(quant))
    wired.init_weights()
    plain = copy.deepcopy(wired)
    fuse_for_training(wired, quant)
    fuse_gelu_quant(plain)
    for blk in wired.blocks:
        sa, ca = blk.self_attn, blk.cross_attn
        assert sa.q.same_input_group is sa.k.same_input_group is sa.v.same_input_group
        assert ca.k.same_input_group is ca.v.same_input_group and not hasattr(ca.q, "same_input_group")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 2, 8, 8, generator=g), torch.rand(1, generator=g) * 1000
    ctx, target = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 2, 8, 8, generator=g)
    losses, grads = [], []
    for model in (wired, plain):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        run = []
        for step in range(3):
            loss = (model(x, t, ctx) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if step == 0:
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][0] == losses[1][0] and losses[0][-1] < losses[0][0], losses      # step 1: same forward
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-4 * abs(b), losses
    assert _rel(grads[0], grads[1].double()) < 2e-3


def test_members_of_other_settings_are_not_grouped():
    """A group runs one GEMM with one setting: members that differ in accumulation or recipe stay
    separate linears."""
    for change in (lambda m: setattr(m.k, "fast_accum", True), lambda m: setattr(m.v, "recipe", "rowwise")):
        torch.manual_seed(3)
        mod = QKV()
        change(mod)
        assert share_input_quantization(mod) == 0 and not hasattr(mod.q, "same_input_group")
