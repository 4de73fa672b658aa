"""GPU lane of the fused GELU + rowwise E4M3 quantization (quant/fp8_gelu_quant_triton.py, quant/fp8_ffn.py).

- the kernel at the 1.3B FFN shape [4680, 8960] vs eager torch on the same GPU: at most 0.1% of the codes differ,
  each by at most one E4M3 step (the kernel's tanh comes from exp), scales within one BF16 ulp;
- FP8GeluFFN with real _scaled_mm vs the plain Sequential (Inductor-free eager path): relative <= 1e-2;
- torch.compile of the fused FFN equals its eager forward bitwise (the custom op is opaque to Inductor).
Run: `python -m pytest -q -m gpu tests/gpu/test_fp8_gelu_quant_gpu.py -s`.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_kernel_vs_torch_at_the_ffn_shape():
    from megatron_longlive.quant.fp8_gelu_quant_triton import gelu_quant_rowwise, gelu_quant_torch

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4680, 8960, generator=g, device="cuda", dtype=torch.bfloat16) * 2
    q, s = gelu_quant_rowwise(h)
    rq, rs = gelu_quant_torch(h)
    a, b = q.float(), rq.float()
    diff = a != b
    ulp = torch.exp2((torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(2.0 ** -9))) - 3)
                     .clamp_min(-9))
    print(f"codes differing: {diff.sum().item()} of {diff.numel()}")
    assert diff.float().mean().item() <= 1e-3 and bool(((a - b).abs() <= ulp).all())
    assert ((s - rs).abs() / rs).max().item() <= 2.0 ** -8


def _ffn():
    from megatron_longlive.quant.fp8 import FP8Linear
    from megatron_longlive.quant.fp8_ffn import FP8GeluFFN

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(1536, 8960), nn.GELU(approximate="tanh"), nn.Linear(8960, 1536))
    seq = seq.to("cuda", torch.bfloat16)
    seq[2] = FP8Linear.from_linear(seq[2], fast_accum=True)
    seq[2].freeze()
    return seq, FP8GeluFFN(*seq)


def test_fused_ffn_vs_sequential_and_compiled():
    seq, ffn = _ffn()
    x = torch.randn(1, 4680, 1536, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, out = seq(x), ffn(x)
        compiled = torch.compile(ffn)(x)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"fused FFN vs plain: relative {rel:.2e}")
    assert rel <= 1e-2
    assert torch.equal(compiled, out)
