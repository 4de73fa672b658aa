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
