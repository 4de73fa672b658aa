"""quant.fp8_fast_accum: only the forward GEMM (training fprop, frozen inference) asks torch._scaled_mm for the
tensor cores' fast accumulator; dgrad and wgrad always promote. The real scaled-mm runs (it has a CPU kernel);
a wrapper records the flag of each call. Results stay the emulation's within the rowwise-FP8 budget."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_longlive.config import QuantConfig
from megatron_longlive.quant.fp8 import FP8Linear
from megatron_longlive.quant.providers import build_linear_provider, convert_linears, freeze_for_inference


@pytest.fixture
def flags(monkeypatch):
    seen: list[bool] = []
    real = torch._scaled_mm

    def recording(*args, use_fast_accum=False, **kwargs):
        seen.append(use_fast_accum)
        return real(*args, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    return seen


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fast", [False, True])
def test_training_fprop_only(flags, fast):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(37, 64, dtype=torch.bfloat16)
    dy = torch.randn(37, 48, dtype=torch.bfloat16)
    ref = FP8Linear.from_linear(lin, emulate=True)
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    want = (xr.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.weight.grad = lin.bias.grad = None
    mod = FP8Linear.from_linear(lin, emulate=False, fast_accum=fast)
    xs = x.clone().requires_grad_()
    y = mod(xs)
    y.backward(dy)
    assert flags == [fast, False, False]                     # fprop, dgrad, wgrad
    assert _rel(y, ref(x)) < 1e-2
    for got, w in zip((xs.grad, lin.weight.grad, lin.bias.grad), want):
        assert _rel(got, w) < 1e-2


def test_config_reaches_inference_and_training_linears(flags):
    torch.manual_seed(0)
    cfg = QuantConfig(linear="fp8", keep_high_precision=[], fp8_fast_accum=True)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16)).to(torch.bfloat16)
    assert convert_linears(model, cfg) == ["0", "2"]
    assert all(m.fast_accum for m in model if isinstance(m, FP8Linear))
    for m in model:
        if isinstance(m, FP8Linear):
            m.emulate = False                                # the real scaled-mm on the CPU
    freeze_for_inference(model)
    with torch.no_grad():
        model(torch.randn(5, 32, dtype=torch.bfloat16))
    assert flags == [True, True]
    built = build_linear_provider(cfg).linear("blocks.0.ffn.0", 32, 64)
    assert isinstance(built, FP8Linear) and built.fast_accum
    assert build_linear_provider(QuantConfig(linear="fp8")).linear("blocks.0.ffn.0", 32, 64).fast_accum   # default
    precise = QuantConfig(linear="fp8", fp8_fast_accum=False)
    assert not build_linear_provider(precise).linear("blocks.0.ffn.0", 32, 64).fast_accum
