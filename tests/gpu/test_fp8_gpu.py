"""GPU lane, FP8 training linear: the compiled Triton quantizer (hardware E4M3 cast and the bit-arithmetic
variant) bitwise equal to the CPU torch reference, its fused column sums equal to float64 sums, and the
CUDA scaled-mm linear (bias in the GEMM epilogue, fused quantization, db from the quantizer) equal to the
CPU emulation up to accumulation order and bf16 output rounding, at a real layer shape.

Run through `device`: python -m pytest -q -m gpu tests/gpu/test_fp8_gpu.py
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.gpu.gpu_helpers import bytes_differ

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]




def _data(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Columns over 5 decades, an all-zero row and column, tiny values, and exact E4M3 ties (row amax 448)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)[None]
    t[1] = 0.0
    t[:, 2] = 0.0
    t[3, :4] = torch.tensor([-0.0, 1e-30, -5e-7, 3.0])
    t[6, :8] = torch.tensor([1.0, 1.0625, 1.1875, -1.0625, 0.0078125, 0.00390625 * 1.5, 2.0 ** -9 * 2.5, 448.0])
    return t


@pytest.mark.parametrize("hw_cast", [True, False])
@pytest.mark.parametrize("shape", [(4100, 1536), (1000, 200)])
def test_fp8_quantize_both_bitwise_vs_cpu(shape, hw_cast):
    from megatron_longlive.quant.fp8 import pad_tokens, quantize_rowwise
    from megatron_longlive.quant.fp8_triton import quantize_both

    for src in (_data(*shape), _data(*shape).to(torch.bfloat16)):
        got = quantize_both(src.cuda(), col_sum=True, hw_cast=hw_cast)
        rq, rs = quantize_rowwise(src)
        rq_t, rs_t = quantize_rowwise(pad_tokens(src.t()))
        for name, g, w in zip(("codes", "scales", "codes^T", "scales^T"), got, (rq, rs, rq_t.contiguous(), rs_t)):
            msg = bytes_differ(g, w)
            assert msg.startswith("0 of"), f"fp8 {src.dtype} hw_cast={hw_cast} {name}: {msg}"
        ref = src.double().sum(0)
        assert torch.all((got[4].cpu().double() - ref).abs() <= 1e-6 * src.double().abs().sum(0) + 1e-30)


def test_fp8_linear_cuda_equals_cpu_emulation():
    """The trainer's path (FP8Linear, scaled-mm on CUDA) vs the exact CPU emulation of the same recipe."""
    from megatron_longlive.quant.fp8 import FP8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 scaled-mm needs sm89+")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 896).to(torch.bfloat16)
    torch.nn.init.normal_(lin.bias, std=0.5)
    x = torch.randn(2, 1003, 1536, dtype=torch.bfloat16)        # 2006 tokens: the wgrad pads to 2016
    dy = torch.randn(2, 1003, 896, dtype=torch.bfloat16)
    emu = FP8Linear.from_linear(copy.deepcopy(lin), emulate=True)               # CPU, torch quantizer
    fast = FP8Linear.from_linear(copy.deepcopy(lin).cuda(), emulate=False)      # CUDA, Triton + scaled-mm
    xe, xf = x.clone().requires_grad_(), x.cuda().requires_grad_()
    ye, yf = emu(xe), fast(xf)
    assert yf.dtype == torch.bfloat16 and yf.shape == ye.shape
    ye.backward(dy)
    yf.backward(dy.cuda())
    for name, a, b in (("y", yf, ye), ("dx", xf.grad, xe.grad), ("dW", fast.weight.grad, emu.weight.grad),
                       ("db", fast.bias.grad, emu.bias.grad)):
        # same E4M3 operands bit for bit; only fp32 accumulation order and bf16 rounding of outputs differ
        err = ((a.float().cpu() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, (name, err)
    # quant.fp8_fast_accum: the forward GEMM in the tensor cores' own accumulator (~14 bits on Hopper, K = 1536)
    quick = FP8Linear.from_linear(copy.deepcopy(lin).cuda(), emulate=False, fast_accum=True)
    with torch.no_grad():
        err = ((quick(x.cuda()).float().cpu() - ye.float()).norm() / ye.float().norm()).item()
    print(f"fast-accum fprop vs exact emulation: relative error {err:.3g}")
    assert err < 2e-2, err


@pytest.mark.parametrize("hw_cast", [True, False])
@pytest.mark.parametrize("shape", [(4100, 1536), (1000, 200)])
def test_fp8_channel_quantizer_and_weight_fold_bitwise_vs_cpu(shape, hw_cast):
    """quant.fp8_recipe=channel_delayed: the one-pass channel quantizer (codes, transposed codes, amax, column
    sums) and the weight fold of quantize_both, hardware cast and bit path, compiled, against the CPU torch
    definitions."""
    from megatron_longlive.quant.fp8 import pad_tokens, quantize_rowwise
    from megatron_longlive.quant.fp8_channel import channel_scales, quantize_channelwise_torch
    from megatron_longlive.quant.fp8_channel_triton import quantize_channelwise
    from megatron_longlive.quant.fp8_triton import quantize_both

    t = _data(*shape)
    _, inv = channel_scales(t.abs().amax(0) * torch.linspace(0.25, 4.0, shape[1]))
    for src in (t, t.to(torch.bfloat16)):
        bits = torch.zeros(shape[1], dtype=torch.int32, device="cuda")
        q, q_t, colsum = quantize_channelwise(src.cuda(), inv.cuda(), bits, col_sum=True, hw_cast=hw_cast)
        rq, rq_t, ramax = quantize_channelwise_torch(src, inv)
        for name, g, w in (("codes", q, rq), ("codes^T", q_t, rq_t), ("amax", bits.view(torch.float32), ramax)):
            msg = bytes_differ(g, w)
            assert msg.startswith("0 of"), f"channel {src.dtype} hw_cast={hw_cast} {name}: {msg}"
        ref = src.double().sum(0)
        assert torch.all((colsum.cpu().double() - ref).abs() <= 1e-6 * src.double().abs().sum(0) + 1e-30)
    if hw_cast:     # every launch config the autotuner may pick, each forced once (bf16, the activations' dtype)
        from megatron_longlive.quant.fp8_channel_triton import CONFIGS

        src = t.to(torch.bfloat16)
        rq, rq_t, _ = quantize_channelwise_torch(src, inv)
        for config in CONFIGS:
            bits = torch.zeros(shape[1], dtype=torch.int32, device="cuda")
            q, q_t = quantize_channelwise(src.cuda(), inv.cuda(), bits, config=config)
            for name, g, w in (("codes", q, rq), ("codes^T", q_t, rq_t)):
                msg = bytes_differ(g, w)
                assert msg.startswith("0 of"), f"channel config {config} {name}: {msg}"
            # out=: the middle column slice of a [M, 3K] buffer and row slice of a [3K, MP] one (fp8_shared_input)
            m, k = shape
            wide = torch.zeros(m, 3 * k, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
            tall = torch.zeros(3 * k, rq_t.shape[1], dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
            bits = torch.zeros(k, dtype=torch.int32, device="cuda")
            quantize_channelwise(src.cuda(), inv.cuda(), bits, config=config, out=(wide[:, k:2 * k], tall[k:2 * k]))
            for name, g, w in (("codes in a slice", wide[:, k:2 * k], rq), ("codes^T in a slice", tall[k:2 * k], rq_t)):
                msg = bytes_differ(g, w)
                assert msg.startswith("0 of"), f"channel config {config} {name}: {msg}"
            untouched = torch.cat([wide[:, :k].reshape(-1), wide[:, 2 * k:].reshape(-1), tall[:k].reshape(-1),
                                   tall[2 * k:].reshape(-1)]).view(torch.uint8)
            assert not untouched.any(), f"channel config {config}: out= wrote outside its slices"
    w = _data(shape[1], 256, seed=1).to(torch.bfloat16)
    rfold, cfold = torch.rand(256) * 3, torch.rand(shape[1]) * 3
    got = quantize_both(w.cuda(), fold=(rfold.cuda(), cfold.cuda()), hw_cast=hw_cast)
    rq, rs = quantize_rowwise(w.float() * rfold[None, :])
    rq_t, rs_t = quantize_rowwise(pad_tokens((w.float() * cfold[:, None]).t()))
    for name, g, want in zip(("codes", "scales", "codes^T", "scales^T"), got, (rq, rs, rq_t.contiguous(), rs_t)):
        msg = bytes_differ(g, want)
        assert msg.startswith("0 of"), f"fold hw_cast={hw_cast} {name}: {msg}"


@pytest.mark.parametrize("fast_backward", [False, True])
def test_fp8_channel_linear_cuda_equals_cpu_emulation_over_steps(fast_backward):
    """Three training steps of the channel recipe (bootstrap, then delayed scales) on CUDA (Triton + scaled-mm)
    against the CPU emulation: same codes, so only accumulation order and bf16 output rounding differ (and, with
    quant.fp8_fast_accum_backward, the fast accumulator of the gradient GEMMs: measured ~1e-3 to 7e-3)."""
    from megatron_longlive.quant.fp8 import FP8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 scaled-mm needs sm89+")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 896).to(torch.bfloat16)
    torch.nn.init.normal_(lin.bias, std=0.5)
    emu = FP8Linear.from_linear(copy.deepcopy(lin), emulate=True, recipe="channel_delayed")
    fast = FP8Linear.from_linear(copy.deepcopy(lin).cuda(), emulate=False, recipe="channel_delayed",
                                 fast_accum_backward=fast_backward)
    for step, gain in enumerate((1.0, 2.0, 0.5)):
        x = torch.randn(2, 1003, 1536, dtype=torch.bfloat16) * gain
        dy = torch.randn(2, 1003, 896, dtype=torch.bfloat16) * gain
        xe, xf = x.clone().requires_grad_(), x.cuda().requires_grad_()
        emu.weight.grad = emu.bias.grad = fast.weight.grad = fast.bias.grad = None
        ye, yf = emu(xe), fast(xf)
        ye.backward(dy)
        yf.backward(dy.cuda())
        for name, a, b in (("y", yf, ye), ("dx", xf.grad, xe.grad), ("dW", fast.weight.grad, emu.weight.grad),
                           ("db", fast.bias.grad, emu.bias.grad)):
            err = ((a.float().cpu() - b.float()).norm() / b.float().norm()).item()
            assert err < 1e-2, (step, name, err)
        for a, b in ((fast.x_scale, emu.x_scale), (fast.dy_scale, emu.dy_scale)):     # the one-launch roll on CUDA
            assert torch.equal(a.history.cpu(), b.history) and a.cursor == b.cursor, step
            assert all(torch.equal(u.cpu(), v) for u, v in zip(a.scales(), b.scales())), step


def test_fp8_channel_fused_ffn_cuda_close_to_cpu_unfused():
    """The fused FFN (GELU in the quantizers, FP8ChannelFFNFunction) on CUDA against the CPU emulation of the
    unfused Sequential of channel FP8Linears, Wan2.1-1.3B widths (1536 -> 8960 -> 1536), three steps."""
    from torch import nn

    from megatron_longlive.quant.fp8 import FP8Linear
    from megatron_longlive.quant.fp8_ffn import FP8GeluFFN

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 scaled-mm needs sm89+")
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(1536, 8960), nn.GELU(approximate="tanh"), nn.Linear(8960, 1536)).to(torch.bfloat16)
    wrap = lambda s, emulate: [FP8Linear.from_linear(copy.deepcopy(m), emulate=emulate, recipe="channel_delayed")  # noqa: E731
                               if isinstance(m, nn.Linear) else m for m in s]
    fused = FP8GeluFFN(*wrap(seq, False)).cuda()
    plain = nn.Sequential(*wrap(seq, True))
    for step, gain in enumerate((1.0, 2.0, 0.5)):
        x = torch.randn(1003, 1536, dtype=torch.bfloat16) * gain
        dy = torch.randn(1003, 1536, dtype=torch.bfloat16) * gain
        xf, xe = x.cuda().requires_grad_(), x.clone().requires_grad_()
        fused.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        yf, ye = fused(xf), plain(xe)
        assert "FP8ChannelFFN" in type(yf.grad_fn).__name__
        yf.backward(dy.cuda())
        ye.backward(dy)
        pairs = [("y", yf, ye), ("dx", xf.grad, xe.grad)] + [
            (n, a.grad, b.grad) for (n, a), b in zip(fused.named_parameters(), plain.parameters())]
        for name, a, b in pairs:
            err = ((a.float().cpu() - b.float()).norm() / b.float().norm()).item()
            assert err < 2e-2, (step, name, err)


def test_fp8_same_input_group_cuda_equals_cpu_separate_linears():
    """q, k, v of the 1.3B shape as one channel linear on CUDA (quant/fp8_shared_input.py: the Triton quantizer
    writing into slices of the concatenated dy codes, one scaled-mm per pass) against three separate channel
    linears emulated on the CPU, three steps with fixed output gradients (so dy, and every amax history, is the
    same in both): histories bitwise, y and dW to accumulation order, dx as close to float64 math as the
    separate linears'."""
    from torch import nn

    from megatron_longlive.quant.fp8 import FP8Linear
    from megatron_longlive.quant.fp8_shared_input import share_input_quantization

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 scaled-mm needs sm89+")

    class QKV(nn.Module):
        same_input = ("q", "k", "v")

        def __init__(self, lins, emulate):
            super().__init__()
            self.q, self.k, self.v = (FP8Linear.from_linear(copy.deepcopy(m), emulate=emulate, fast_accum=True,
                                                            recipe="channel_delayed", fast_accum_backward=True)
                                      for m in lins)

        def forward(self, x):
            return self.q(x), self.k(x), self.v(x)

    torch.manual_seed(0)
    lins = [nn.Linear(1536, 1536).to(torch.bfloat16) for _ in range(3)]
    for m in lins:
        nn.init.normal_(m.bias, std=0.5)
    fused, plain = QKV(lins, False).cuda(), QKV(lins, True)
    assert share_input_quantization(fused) == 1
    for step, gain in enumerate((1.0, 2.0, 0.5)):
        x = torch.randn(2, 1003, 1536, dtype=torch.bfloat16) * gain
        dys = [torch.randn(2, 1003, 1536, dtype=torch.bfloat16) * gain for _ in range(3)]
        xf, xe = x.cuda().requires_grad_(), x.clone().requires_grad_()
        fused.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        yf, ye = fused(xf), plain(xe)
        assert yf[0].grad_fn is yf[2].grad_fn and "SameInput" in type(yf[0].grad_fn).__name__
        torch.autograd.backward(yf, [d.cuda() for d in dys])
        torch.autograd.backward(ye, dys)
        pairs = [(f"y{i}", a, b) for i, (a, b) in enumerate(zip(yf, ye))] + [
            (n, a.grad, b.grad) for (n, a), b in zip(fused.named_parameters(), plain.parameters())]
        for name, a, b in pairs:
            err = ((a.float().cpu() - b.float()).norm() / b.float().norm()).item()
            assert err < 1e-2, (step, name, err)
        for lf, le in zip((fused.q, fused.k, fused.v), (plain.q, plain.k, plain.v)):
            assert torch.equal(lf.dy_scale.history.cpu(), le.dy_scale.history), step
        assert torch.equal(fused.q.x_scale.history.cpu(), plain.q.x_scale.history), step
        exact = sum(d.double() @ m.weight.detach().double() for d, m in zip(dys, lins))
        err_f = ((xf.grad.double().cpu() - exact).norm() / exact.norm()).item()
        err_p = ((xe.grad.double() - exact).norm() / exact.norm()).item()
        print(f"step {step}: dx error vs float64, one GEMM {err_f:.4e}, separate {err_p:.4e}")
        assert err_f <= 1.05 * err_p + 1e-4, (step, err_f, err_p)
