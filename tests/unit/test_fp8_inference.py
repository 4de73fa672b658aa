"""FP8 inference path: frozen E4M3 weights + per-call activation quantization == the training FP8 linear's forward.

Both quantize x and W row by row with the same formula, so in emulation (CPU) the frozen path must be bitwise
equal to `FP8LinearFunction`'s forward; gradients must still flow through the unfrozen path in training.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_longlive.quant.fp8 import FP8Linear, dequantize_rowwise, quantize_rowwise
from megatron_longlive.quant.providers import freeze_for_inference


def test_frozen_forward_equals_training_forward():
    torch.manual_seed(0)
    lin = FP8Linear(64, 48, emulate=True)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        before = lin(x)
    assert freeze_for_inference(nn.Sequential(lin, nn.GELU())) == 1
    assert lin.qweight.dtype == torch.float8_e4m3fn and lin.wscale.shape == (48, 1)
    with torch.no_grad():
        after = lin(x)
    assert torch.equal(after, before)
    # and it is the FP8 product, not the high-precision one: float64 math on the quantized operands
    qx, sx = quantize_rowwise(x.reshape(-1, 64))
    ref = dequantize_rowwise(qx, sx).double() @ dequantize_rowwise(lin.qweight, lin.wscale).double().t() + lin.bias.double()
    assert torch.allclose(after.reshape(-1, 48).double(), ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after, nn.functional.linear(x, lin.weight, lin.bias), atol=1e-4)


def test_frozen_weights_are_not_state_and_training_still_has_gradients():
    lin = FP8Linear(32, 32, emulate=True)
    lin.freeze()
    assert set(lin.state_dict()) == {"weight", "bias"}          # checkpoints are unchanged by freezing
    x = torch.randn(4, 32, requires_grad=True)
    lin(x).sum().backward()                                    # grad mode: the 3-GEMM autograd path
    assert lin.weight.grad is not None and x.grad is not None
