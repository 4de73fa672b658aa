"""The channel-scaled FP8 training recipe (quant.fp8_recipe=channel_delayed, quant/fp8_channel.py).

Tier (a): the codes against an independent float64 E4M3 rounding. Tier (b)/(c): the linear equals its three-GEMM
definition built from the codes, is close to float64 math, follows the delayed-scaling rules (scales from earlier
calls, rolled once per backward, saturation then recovery, recompute-safe), the fused FFN equals the unfused one,
and the tiny model trains tracking BF16. The real torch._scaled_mm path: tests/unit/test_nvfp4_fp8.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_longlive.config import QuantConfig
from megatron_longlive.quant.fp8 import TOKEN_PAD, FP8Linear, dequantize_rowwise, quantize_rowwise
from megatron_longlive.quant.fp8_channel import DelayedChannelScale, channel_scales, quantize_channelwise_torch
from megatron_longlive.quant.providers import build_linear_provider, convert_linears


def _e4m3_f64(v: float) -> float:
    """Independent E4M3 nearest-even rounding with saturation (3 mantissa bits, subnormal quantum 2**-9)."""
    if v == 0:
        return 0.0
    e = max(int(np.floor(np.log2(abs(v)))), -6)
    q = 2.0 ** (e - 3)
    return float(np.sign(v) * min(np.round(abs(v) / q) * q, 448.0))


def _channel(f: FP8Linear):
    return f.x_scale, f.dy_scale


def test_channel_codes_match_independent_rounding_and_share_one_copy():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(21, 6, generator=g) * torch.tensor([1.0, 1e-3, 100.0, 0.0, 5.0, 0.5])
    amax = t.abs().amax(0) * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.25, 4.0])   # col 4 saturates, col 5 has headroom
    scale, inv = channel_scales(amax)
    assert scale[3] == 1.0 and inv[3] == 1.0                                  # zero channel: no NaN
    q, q_t, got_amax = quantize_channelwise_torch(t, inv)
    assert torch.equal(got_amax, t.abs().amax(0))
    for k in range(6):
        want = [_e4m3_f64(float(np.float32(v) * np.float32(inv[k]))) for v in t[:, k].tolist()]
        assert q[:, k].float().tolist() == want, k
    assert q[:, 4].float().abs().max() == 448.0 and (q[:, 4].float().abs() == 448.0).sum() > 1   # saturated
    assert q_t.shape == (6, TOKEN_PAD) and torch.equal(q_t[:, :21].view(torch.uint8), q.view(torch.uint8).t())
    assert torch.all(q_t[:, 21:].float() == 0)


def test_delayed_scale_history_max_margin_and_roll():
    s = DelayedChannelScale(length=2, margin=1)
    s.bootstrap(torch.tensor([[1.0, -4.0], [0.5, 2.0]]))
    assert torch.equal(s.scales()[0], torch.tensor([2.0, 8.0]) / 448)
    s.pending.copy_(torch.tensor([3.0, 1.0]).view(torch.int32))
    assert torch.equal(s.scales()[0], torch.tensor([2.0, 8.0]) / 448)        # unchanged until the roll
    s.roll()
    assert torch.equal(s.scales()[0], torch.tensor([6.0, 8.0]) / 448)
    s.roll()                                                                  # the bootstrap amax drops out
    assert torch.equal(s.scales()[0], torch.tensor([6.0, 2.0]) / 448)
    with pytest.raises(ValueError, match="fp8_amax_history"):
        DelayedChannelScale(length=0)


def _definition(x2, w, b, dy2, xs_hist, dys_hist, margin=2):
    """The recipe from the channel scales of given histories, op by op in float64 from independent codes."""
    s_x, inv_x = channel_scales(xs_hist.amax(0) * 2.0 ** margin)
    s_dy, inv_dy = channel_scales(dys_hist.amax(0) * 2.0 ** margin)
    qx = quantize_channelwise_torch(x2, inv_x)[0].double()
    qdy = quantize_channelwise_torch(dy2, inv_dy)[0].double()
    fq = lambda t: dequantize_rowwise(*quantize_rowwise(t)).double()          # noqa: E731
    y = qx @ fq(w.float() * s_x[None, :]).t() + b.double()
    dx = qdy @ fq(w.float().t() * s_dy[None, :]).t()
    dw = (qdy * s_dy.double()).t() @ (qx * s_x.double())
    return y, dx, dw


def test_emulated_channel_linear_equals_its_definition_over_steps():
    """Step 1 bootstraps from its own amaxes; step 2 quantizes with step 1's (delayed); step 3 with the max of
    both. fp32 emulation vs the float64 definition: equal up to fp32 accumulation."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    f = FP8Linear.from_linear(lin, emulate=True, recipe="channel_delayed")
    xs_hist, dys_hist = [], []
    for step, gain in enumerate((1.0, 3.0, 0.5)):
        x = (torch.randn(530, 64) * gain).requires_grad_()      # > one 512-token strip; wgrad pads to 544
        dy = torch.randn(530, 48) * gain
        lin.weight.grad = lin.bias.grad = None
        y = f(x)
        assert y.grad_fn.saved_tensors[0].shape == (64, 640)                # x^T codes: tokens padded to TOKEN_PAD
        y.backward(dy)
        xs_hist.append(x.detach().abs().amax(0))
        dys_hist.append(dy.abs().amax(0))
        n = 1 if step == 0 else step                                          # histories the call used
        want = _definition(x.detach(), lin.weight.detach(), lin.bias.detach(), dy,
                           torch.stack(xs_hist[:n] if step else xs_hist), torch.stack(dys_hist[:n] if step else dys_hist))
        for name, got, w in (("y", y, want[0]), ("dx", x.grad, want[1]), ("dW", lin.weight.grad, want[2])):
            err = ((got.double() - w).norm() / w.norm()).item()
            assert err < 2e-6, (step, name, err)
        assert torch.allclose(lin.bias.grad.double(), dy.double().sum(0), atol=1e-4)
    xs, dys = _channel(f)
    assert torch.equal(xs.newest_first()[0], xs_hist[-1]) and torch.equal(dys.newest_first()[2], dys_hist[0])


def test_channel_linear_close_to_float64_math_and_recovers_from_saturation():
    """Same E4M3 budget as the rowwise recipe (3.6% rms per value, ~4% per product). A step 64x above the history
    (beyond the 4x headroom) saturates, and the next step is back in budget (its scale saw the big amax)."""
    torch.manual_seed(3)
    lin = nn.Linear(256, 192).double()
    f = FP8Linear.from_linear(copy.deepcopy(lin).float(), emulate=True, recipe="channel_delayed")
    errs = []
    for gain in (1.0, 1.0, 64.0, 64.0, 1.0):
        x = torch.randn(300, 256, dtype=torch.float64) * gain
        dy = torch.randn(300, 192, dtype=torch.float64)
        xd, xf = x.clone().requires_grad_(), x.float().requires_grad_()
        lin.zero_grad()
        f.weight.grad = f.bias.grad = None
        yd, yf = lin(xd), f(xf)
        yd.backward(dy)
        yf.backward(dy.float())
        errs.append([((g.double() - w).norm() / w.norm()).item()
                     for g, w in ((yf, yd), (xf.grad, xd.grad), (f.weight.grad, lin.weight.grad))])
    for i in (0, 1, 3, 4):
        assert all(0.005 < e < 0.08 for e in errs[i]), (i, errs[i])
    assert errs[2][0] > 0.5 and errs[2][1] < 0.08       # x saturated (y wrong); dy's own scale was fine


def test_two_forwards_then_backwards_and_checkpoint_recompute_use_the_forward_scales():
    """Histories roll only in backward: a recomputed forward (activation checkpointing) quantizes exactly as the
    first one, so the gradients equal the plain run's; interleaved forwards keep their own dy scale."""
    torch.manual_seed(5)
    lin = nn.Linear(32, 32)
    plain = FP8Linear.from_linear(copy.deepcopy(lin), emulate=True, recipe="channel_delayed")
    ckpt = FP8Linear.from_linear(copy.deepcopy(lin), emulate=True, recipe="channel_delayed")
    for step in range(3):
        x = torch.randn(40, 32) * (1 + step)
        xp, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        plain(xp).pow(2).sum().backward()
        checkpoint(ckpt, xc, use_reentrant=False).pow(2).sum().backward()
        assert torch.equal(xp.grad, xc.grad) and torch.equal(plain.weight.grad, ckpt.weight.grad), step
    a, b = torch.randn(40, 32).requires_grad_(), (torch.randn(40, 32) * 9).requires_grad_()
    ya, yb = plain(a), plain(b)                          # both before any backward
    ya.sum().backward()
    yb.sum().backward()                                  # dy scale of b's forward, not the rolled one
    assert torch.isfinite(b.grad).all() and torch.isfinite(plain.weight.grad).all()


def test_provider_and_convert_build_the_recipe_from_config():
    cfg = QuantConfig(linear="fp8", fp8_recipe="channel_delayed", fp8_amax_history=4, fp8_amax_margin=1,
                      keep_high_precision=[])
    lin = build_linear_provider(cfg).linear("blocks.0.ffn.0", 32, 64)
    assert lin.recipe == "channel_delayed" and lin.x_scale.length == 4 and lin.dy_scale.margin == 1
    model = nn.Sequential(nn.Linear(32, 32))
    convert_linears(model, cfg)
    assert model[0].recipe == "channel_delayed"
    with pytest.raises(ValueError, match="fp8_recipe"):
        FP8Linear(32, 32, recipe="blockwise")


@pytest.mark.parametrize("recipe", ["rowwise", "channel_delayed"])
def test_fast_accum_backward_reaches_the_gradient_gemms(recipe, monkeypatch):
    """quant.fp8_fast_accum_backward: config -> provider -> module -> the dgrad and wgrad GEMM calls (a spy that
    records each call's flag and runs the real GEMM), for both recipes and the fused FFN; off by default."""
    from megatron_longlive.quant import fp8, fp8_channel
    from megatron_longlive.quant.fp8_ffn import FP8GeluFFN

    calls = []

    def spy(qa, sa, qb, sb, emulate, out_dtype, bias=None, fast_accum=False):
        calls.append(fast_accum)
        return real(qa, sa, qb, sb, emulate, out_dtype, bias, fast_accum)

    real = fp8.fp8_gemm
    monkeypatch.setattr(fp8, "fp8_gemm", spy)
    monkeypatch.setattr(fp8_channel, "fp8_gemm", spy)
    for flag in (False, True):
        cfg = QuantConfig(linear="fp8", fp8_recipe=recipe, fp8_fast_accum=False, fp8_fast_accum_backward=flag,
                          keep_high_precision=[])
        provider = build_linear_provider(cfg)
        fc1, fc2 = (provider.linear(f"blocks.0.ffn.{i}", a, b) for i, a, b in ((0, 32, 64), (2, 64, 32)))
        assert QuantConfig().fp8_fast_accum_backward is True and fc1.fast_accum_backward is flag
        mods = [fc1] + ([FP8GeluFFN(fc1, nn.GELU(approximate="tanh"), fc2)] if recipe == "channel_delayed" else [])
        for mod in mods:
            calls.clear()
            x = torch.randn(40, 32, requires_grad=True)
            mod(x).sum().backward()
            fwd = 1 if mod is fc1 else 2
            assert calls[:fwd] == [False] * fwd and calls[fwd:] == [flag] * (len(calls) - fwd) and len(calls) > fwd


def test_ones_column_is_a_read_only_view_of_one_growing_buffer():
    from megatron_longlive.quant.fp8_channel import ones_column

    a, b = ones_column(30, "cpu"), ones_column(10, "cpu")
    assert a.shape == (30, 1) and b.shape == (10, 1) and b.data_ptr() == a.data_ptr() and torch.all(a == 1)
    c = ones_column(100, "cpu")                                   # grows; earlier views stay valid
    assert c.shape == (100, 1) and c.is_contiguous() and torch.all(c == 1) and torch.all(a == 1)
    assert ones_column(50, "cpu").data_ptr() == c.data_ptr()


def test_no_grad_forward_scales_per_token_and_leaves_the_history_alone():
    """Without grad nothing would roll the delayed scales, so a no-grad forward of a channel-recipe linear (not
    frozen) quantizes with current per-token scales: the rowwise recipe's output, bit for bit; state untouched."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    chan = FP8Linear.from_linear(lin, emulate=True, recipe="channel_delayed")
    row = FP8Linear.from_linear(lin, emulate=True, recipe="rowwise")
    x = torch.randn(30, 64) * 5
    with torch.no_grad():
        assert torch.equal(chan(x), row(x))
    assert not chan.x_scale.ready and not chan.dy_scale.ready
    y = chan(x.requires_grad_())                       # with grad: the channel recipe again
    assert "FP8Channel" in type(y.grad_fn).__name__ and chan.x_scale.ready


def test_tiny_wan_trains_with_channel_fp8_tracking_bf16():
    """8 AdamW steps of the tiny model (fp32 math, emulated FP8, 20 FP8 linears): measured max relative loss gap
    to the unquantized run 0.015% (rowwise recipe: 0.16%); tolerance 5%, as for NVFP4."""
    from test_nvfp4_linear import _train

    base = _train(QuantConfig(linear="bf16"))
    q = _train(QuantConfig(linear="fp8", fp8_recipe="channel_delayed"))
    gap = max(abs(a - b) / b for a, b in zip(q, base))
    assert gap < 0.05, (gap, q, base)
    assert q != base and q[-1] < 0.8 * q[0]


def _ffn(recipe_linears: bool = True):
    from megatron_longlive.quant.fp8_ffn import FP8GeluFFN

    torch.manual_seed(7)
    seq = nn.Sequential(nn.Linear(64, 160), nn.GELU(approximate="tanh"), nn.Linear(160, 64))
    fused = FP8GeluFFN(*(FP8Linear.from_linear(copy.deepcopy(m), emulate=True, recipe="channel_delayed")
                         if isinstance(m, nn.Linear) else m for m in seq))
    plain = nn.Sequential(*(FP8Linear.from_linear(copy.deepcopy(m), emulate=True, recipe="channel_delayed")
                            if isinstance(m, nn.Linear) else m for m in seq))
    return fused, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ffn_equals_the_unfused_sequential_of_channel_linears(dtype):
    """FP8ChannelFFNFunction (GELU folded into fc2's quantizer, its backward into fc1's dy quantizer) against
    the plain Sequential(fc1, GELU, fc2) of channel FP8Linears, whose GELU runs in autograd: bitwise equal
    outputs, gradients and amax histories over three steps (bootstrap, then delayed)."""
    fused, plain = _ffn()
    fused, plain = fused.to(dtype), plain.to(dtype)
    for step, gain in enumerate((1.0, 2.5, 0.7)):
        x = (torch.randn(3, 177, 64) * gain).to(dtype)
        dy = (torch.randn(3, 177, 64) * gain).to(dtype)
        outs = []
        for mod in (fused, plain):
            mod.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            y = mod(xx)
            fn = type(y.grad_fn).__name__
            assert ("FP8ChannelFFN" in fn) == (mod is fused), fn      # the fused path ran (and only there)
            y.backward(dy)
            outs.append([y.detach(), xx.grad] + [p.grad for p in mod.parameters()]
                        + [m.x_scale.history for m in (mod[0], mod[2])] + [m.dy_scale.history for m in (mod[0], mod[2])])
        for i, (a, b) in enumerate(zip(*outs)):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, i)


def test_trainer_builds_the_fused_ffn_only_for_the_channel_recipe():
    from megatron_longlive.config import preset_config
    from megatron_longlive.models.wan import WanDiT
    from megatron_longlive.quant.fp8_ffn import FP8GeluFFN, fuse_for_training

    for cfg, want in ((QuantConfig(linear="fp8", fp8_recipe="channel_delayed"), True),
                      (QuantConfig(linear="fp8", fp8_recipe="rowwise"), False), (QuantConfig(linear="bf16"), False)):
        assert QuantConfig(linear="fp8").fp8_recipe == "channel_delayed"           # the default
        model = WanDiT(preset_config("tiny"), build_linear_provider(cfg))
        n = fuse_for_training(model, cfg)
        kinds = {type(b.ffn) for b in model.blocks}
        assert (kinds == {FP8GeluFFN}) == want and (n == len(model.blocks)) == want, (cfg, kinds)


def test_fused_ffn_under_checkpointing_keeps_nothing_from_the_first_forward():
    """Non-reentrant activation checkpointing drops what save_for_backward holds and recomputes it; a tensor kept
    as a plain ctx attribute would stay alive for every block until its backward. The fused FFN's backward node
    holds no tensor outside save_for_backward (checked on the step whose forward folds the dgrad weights), and
    the checkpointed gradients equal the plain run's."""
    def tensors_in(v):
        if isinstance(v, torch.Tensor):
            return 1
        return sum(tensors_in(u) for u in v) if isinstance(v, (tuple, list)) else 0

    fused, _ = _ffn()
    ref = copy.deepcopy(fused)
    x = torch.randn(64, 64)
    for step in range(2):
        xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        y = checkpoint(fused, xc, use_reentrant=False)
        node = y.grad_fn
        assert "FP8ChannelFFN" in type(node).__name__
        assert sum(tensors_in(v) for v in vars(node).values()) == 0, {k: type(v) for k, v in vars(node).items()}
        y.pow(2).sum().backward()
        ref(xr).pow(2).sum().backward()
        assert torch.equal(xc.grad, xr.grad), step
        for a, b in zip(fused.parameters(), ref.parameters()):
            assert torch.equal(a.grad, b.grad), step
