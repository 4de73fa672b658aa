"""FP8 (Hopper path): rowwise E4M3 quantization, the emulated three-GEMM linear vs its definition and vs
torch._scaled_mm where this torch runs it (CPU here, the GPU lane on H100)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_longlive.config import QuantConfig, preset_config
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.quant.fp8 import FP8Linear, dequantize_rowwise, quantize_rowwise
from megatron_longlive.quant.providers import build_linear_provider


def _e4m3_f64(v: float) -> float:
    """Independent E4M3 nearest-even rounding (normals: 3 mantissa bits; subnormal quantum 2**-9)."""
    if v == 0:
        return 0.0
    e = max(int(np.floor(np.log2(abs(v)))), -6)
    q = 2.0 ** (e - 3)
    n = np.round(abs(v) / q)                   # numpy rounds half to even
    return float(np.sign(v) * min(n * q, 448.0))


def test_rowwise_quantization_matches_independent_rounding():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 32, generator=g) * torch.tensor([1.0, 1e-3, 100.0, 0.0])[:, None]
    q, s = quantize_rowwise(t)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 1)
    assert s[3].item() == 1.0 and torch.all(q[3].float() == 0)            # all-zero row: scale 1, no NaN
    for r in range(3):
        amax = np.float32(t[r].abs().max())
        scale, inverse = amax / np.float32(448.0), np.float32(448.0) / amax      # fp32 divisions
        assert s[r].item() == scale
        want = [_e4m3_f64(float(np.float32(v) * inverse)) for v in t[r].tolist()]
        assert q[r].float().tolist() == want
        assert q[r].float().abs().max() == 448.0                            # the row amax maps to 448
    err = (dequantize_rowwise(q, s) - t).abs()
    assert torch.all(err <= t.abs() * 2.0 ** -4 + s * 2.0 ** -10)


def test_emulated_fp8_linear_equals_quantize_dequantize_definition():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    f = FP8Linear.from_linear(lin, emulate=True)
    x = torch.randn(3, 7, 64, requires_grad=True)                  # 21 tokens: wgrad pads to 32
    dy = torch.randn(3, 7, 32)
    y = f(x)
    y.backward(dy)
    fq = lambda t: dequantize_rowwise(*quantize_rowwise(t))        # noqa: E731
    x2, dy2, w = x.detach().reshape(-1, 64), dy.reshape(-1, 32), lin.weight.detach()
    assert torch.equal(y.detach().reshape(-1, 32), fq(x2) @ fq(w).t() + lin.bias.detach())
    assert torch.equal(x.grad.reshape(-1, 64), fq(dy2) @ fq(w.t().contiguous()).t())
    assert torch.equal(f.weight.grad, fq(dy2.t().contiguous()) @ fq(x2.t().contiguous()).t())
    assert torch.allclose(f.bias.grad, dy2.sum(0), atol=1e-5)
    assert F.cosine_similarity(y.detach().flatten(), lin(x.detach()).detach().flatten(), dim=0) > 0.999


def test_fp8_linear_close_to_float64_math():
    """Forward and both gradients vs unquantized float64 math: E4M3 keeps 3 mantissa bits (relative rounding
    error <= 2**-4, rms ~2**-4/sqrt(3) = 3.6% per value); a dot product of two such operands averages the
    independent errors, so the relative norm error of y, dx, dW stays near 4% (bound 8%), and db is exact math."""
    torch.manual_seed(3)
    lin = nn.Linear(256, 192).double()
    f = FP8Linear.from_linear(copy.deepcopy(lin).float(), emulate=True)
    x = torch.randn(300, 256, dtype=torch.float64)
    dy = torch.randn(300, 192, dtype=torch.float64)
    xd, xf = x.clone().requires_grad_(), x.float().requires_grad_()
    yd, yf = lin(xd), f(xf)
    yd.backward(dy)
    yf.backward(dy.float())
    for name, got, want in (("y", yf, yd), ("dx", xf.grad, xd.grad), ("dW", f.weight.grad, lin.weight.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert 0.005 < err < 0.08, (name, err)            # quantized (not exact), within the FP8 budget
    assert torch.allclose(f.bias.grad.double(), lin.bias.grad, rtol=1e-5, atol=1e-5)


def test_fp8_linear_under_autocast_returns_the_autocast_dtype_of_exact_fp32_math():
    """As nn.Linear under bf16 autocast: y comes out in bf16 even for fp32 x (a norm's output), and it is the
    fp32 emulation rounded once (autocast must not turn the emulated GEMM into a bf16 matmul); dx stays fp32."""
    torch.manual_seed(2)
    lin = nn.Linear(64, 32)
    f = FP8Linear.from_linear(lin, emulate=True)
    x = torch.randn(40, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
        assert lin(x).dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    fq = lambda t: dequantize_rowwise(*quantize_rowwise(t))        # noqa: E731
    w = lin.weight.detach()
    assert torch.equal(y, (fq(x.detach()) @ fq(w).t() + lin.bias.detach()).to(torch.bfloat16))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and f.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("recipe", ["rowwise", "channel_delayed"])
def test_scaled_mm_path_matches_emulation_where_available(recipe):
    """The real torch._scaled_mm (it has a CPU kernel) against the emulation of the same codes, two steps (the
    channel recipe's second one runs on delayed scales)."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    # separate parameter copies: from_linear shares parameters, and shared grads would compare to themselves
    fast = FP8Linear.from_linear(lin, emulate=False, recipe=recipe)
    emu = FP8Linear.from_linear(copy.deepcopy(lin), emulate=True, recipe=recipe)
    assert fast.weight is not emu.weight
    for _ in range(2):
        x = torch.randn(32, 64, dtype=torch.bfloat16)
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        try:
            yf = fast(xf)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"torch._scaled_mm with rowwise scales does not run on this device: {exc}")
        ye = emu(xe)
        dy = torch.randn_like(ye)
        fast.weight.grad = emu.weight.grad = None
        yf.backward(dy)
        ye.backward(dy)
        for a, b in ((yf, ye), (xf.grad, xe.grad), (fast.weight.grad, emu.weight.grad)):
            # same quantized operands; only accumulation order and the bf16 output rounding differ
            assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


def test_fp8_provider_builds_fp8_linears_outside_the_keep_list():
    model = WanDiT(preset_config("tiny"), build_linear_provider(QuantConfig(linear="fp8")))
    mods = dict(model.named_modules())
    assert type(mods["blocks.0.ffn.0"]) is FP8Linear and type(mods["head.head"]) is nn.Linear
    x = torch.randn(1, 16, 1, 8, 8)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 16, 32))
    out.pow(2).mean().backward()
    assert torch.isfinite(mods["blocks.0.ffn.0"].weight.grad).all()
