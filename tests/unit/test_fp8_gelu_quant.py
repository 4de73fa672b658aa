"""GELU fused with the rowwise E4M3 quantization of fc2's input (quant/fp8_gelu_quant_triton.py, quant/fp8_ffn.py).

- the Triton kernel (TRITON_INTERPRET=1 on the CPU, set by tests/conftest.py) vs eager torch
  (`fp8.quantize_rowwise(F.gelu(h))`): the kernel's tanh comes from exp, so a GELU value may land one BF16 ulp
  away: at most 0.1% of the codes may differ, each by at most one E4M3 step, scales by at most one BF16 ulp;
  all-zero rows give zero codes and scale 1; large |h| (saturated tanh) gives no NaN;
- FP8GeluFFN vs the plain Sequential it replaces (same weights, emulated FP8 GEMM): close on the fused path,
  bitwise equal where the fused path is off (fc2 not frozen, grad mode);
- fuse_gelu_quant swaps only fc1 -> GELU(tanh) -> FP8Linear and keeps the state-dict keys;
- the custom op's fake implementation (torch.library.opcheck), for torch.compile.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from megatron_longlive.quant.fp8 import FP8Linear
from megatron_longlive.quant.fp8_ffn import FP8GeluFFN, fuse_gelu_quant
from megatron_longlive.quant.fp8_gelu_quant_triton import gelu_quant_rowwise, gelu_quant_torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py)")

def test_kernel_vs_eager_torch():
    """Runs the Triton kernel: tests/conftest.py sets TRITON_INTERPRET=1 (the CPU lane)."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(41, 600, generator=g) * 3).to(torch.bfloat16)
    h[3] = 0
    h[5, :7] = 40.0                                  # saturated tanh
    q, s = gelu_quant_rowwise(h)
    rq, rs = gelu_quant_torch(h)
    a, b = q.float(), rq.float()
    diff = a != b
    ulp = torch.exp2((torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(2.0 ** -9))) - 3)
                     .clamp_min(-9))                 # one E4M3 step at that magnitude (subnormals: 2^-9)
    print(f"codes differing: {diff.sum().item()} of {diff.numel()}")
    assert diff.float().mean().item() <= 1e-3 and bool(((a - b).abs() <= ulp).all())
    assert ((s - rs).abs() / rs).max().item() <= 2.0 ** -8
    assert torch.equal(s[3], torch.ones(1)) and not a[3].any() and not torch.isnan(a).any()


def test_fused_ffn_is_the_kernel_path_and_close_to_the_sequential():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(64, 1024), nn.GELU(approximate="tanh"), nn.Linear(1024, 48)).to(torch.bfloat16)
    seq[2] = FP8Linear.from_linear(seq[2], emulate=True)
    seq[2].freeze()
    ffn = FP8GeluFFN(*seq)
    x = torch.randn(3, 20, 64, dtype=torch.bfloat16) * 4
    with torch.no_grad():
        ref, out = seq(x), ffn(x)
        h = seq[0](x).reshape(-1, 1024)
        q, sq = gelu_quant_rowwise(h)
        assert not torch.equal(q.float(), gelu_quant_torch(h)[0].float())   # this data tells the two paths apart
        kernel_path = seq[2].frozen_gemm(q, sq)
    assert torch.equal(out, kernel_path.to(x.dtype).view_as(out))
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"fused vs plain FFN: relative {rel:.2e}")
    assert out.shape == ref.shape and out.dtype == ref.dtype and rel <= 1e-2


def _ffn_model():
    torch.manual_seed(0)
    model = nn.Module()
    model.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32))
    model.other = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))    # exact GELU: not fused
    model.ffn[2] = FP8Linear.from_linear(model.ffn[2], emulate=True)
    model.other[2] = FP8Linear.from_linear(model.other[2], emulate=True)
    return model


def test_fuse_swaps_only_tanh_gelu_fp8_ffns_and_keeps_keys():
    model = _ffn_model()
    keys = list(model.state_dict())
    assert fuse_gelu_quant(model) == 1
    assert type(model.ffn) is FP8GeluFFN and type(model.other) is nn.Sequential
    assert list(model.state_dict()) == keys


def test_unfused_cases_equal_the_sequential_bitwise():
    model = _ffn_model()
    plain = nn.Sequential(*model.ffn)
    fuse_gelu_quant(model)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(model.ffn(x), plain(x))               # fc2 not frozen: the plain Sequential
    model.ffn[2].freeze()
    assert torch.equal(model.ffn(x), plain(x))                   # grad mode: the training path


def test_custom_op_fake_matches():
    h = torch.randn(6, 40, dtype=torch.bfloat16)
    torch.library.opcheck(gelu_quant_rowwise, (h,), test_utils=("test_schema", "test_faketensor"))
