"""Tier (b): the fused FP8 training quantizer (fp8_triton.quantize_both) bitwise equal to the torch reference
(fp8.quantize_rowwise of t and of pad(t^T)), and its fused column sums (the bias gradient) equal to float64
sums within fp32 rounding. Run by the Triton interpreter on CPU (bit-arithmetic rounding; the GPU lane checks
the hardware-cast variant: tests/gpu/test_nvfp4_gpu.py). Shapes span several stats strips (512 tokens)
and column tiles, with partial tiles in both dims.
"""
from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - the GPU lane runs tests/gpu/test_nvfp4_gpu.py compiled
    pytest.skip("interpreter tests run on CPU machines", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"

from megatron_longlive.quant import fp8_triton  # noqa: E402
from megatron_longlive.quant.fp8 import FP8Linear, dequantize_rowwise, pad_tokens, quantize_rowwise  # noqa: E402


def _bytes_differ(got: torch.Tensor, want: torch.Tensor) -> int:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    bytes_of = lambda t: t.reshape(-1).contiguous().view(torch.uint8)   # noqa: E731
    return int((bytes_of(got) != bytes_of(want)).sum())


def _hard_data(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Columns over 5 decades, an all-zero row and column, signed zero, tiny values, and exact E4M3 ties."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)[None]
    t[1] = 0.0
    t[:, 2] = 0.0
    t[3, :4] = torch.tensor([-0.0, 1e-30, -5e-7, 3.0])
    t[5, :] = 448.0 / 2 ** torch.arange(k).remainder(20)       # row amax 448: multiplier 1, values on the grid
    # row amax 448 again; 1.0625, 1.1875 and 2.5 * 2**-9 are ties (to 1.0, 1.25 and 2 * 2**-9, even codes)
    t[6, :8] = torch.tensor([1.0, 1.0625, 1.1875, -1.0625, 0.0078125, 0.00390625 * 1.5, 2.0 ** -9 * 2.5, 448.0])
    return t


@pytest.mark.parametrize("shape", [(1100, 200), (70, 48), (16, 32)])
def test_quantize_both_bitwise_and_column_sums(shape):
    t = _hard_data(*shape)
    for src in (t, t.to(torch.bfloat16)):
        q, s, q_t, s_t, colsum = fp8_triton.quantize_both(src, col_sum=True)
        rq, rs = quantize_rowwise(src)
        rq_t, rs_t = quantize_rowwise(pad_tokens(src.t()))
        for what, got, want in (("codes", q, rq), ("scales", s, rs), ("codes^T", q_t, rq_t.contiguous()),
                                ("scales^T", s_t, rs_t)):
            n = _bytes_differ(got, want)
            assert n == 0, f"{src.dtype} {what}: {n} of {want.numel() * want.element_size()} bytes differ"
        ref = src.double().sum(0)
        tol = 1e-6 * src.double().abs().sum(0) + 1e-30
        assert colsum.dtype == torch.float32 and torch.all((colsum.double() - ref).abs() <= tol)
        assert q_t.shape == (shape[1], (shape[0] + 15) // 16 * 16) and torch.all(q_t[:, shape[0]:].float() == 0)


def test_quantize_both_without_column_sums_returns_four():
    out = fp8_triton.quantize_both(torch.randn(40, 32), col_sum=False)
    assert len(out) == 4


def test_fp8_linear_backward_with_fused_quantizer_equals_its_definition(monkeypatch):
    """The linear wired to the Triton quantizer (as on CUDA) gives the same dx, dW, db as the torch-quantized
    definition: dx = fq(dy) fq(W^T)^T, dW = fq(dy^T) fq(x^T)^T, db = sum dy (fq = quantize-dequantize)."""
    from megatron_longlive.quant import fp8

    def fused(t, col_sum=False, pad=16):
        out = fp8_triton.quantize_both(t, col_sum=col_sum, pad=pad)
        return out[:4] + (out[4].to(t.dtype),) if col_sum else out

    monkeypatch.setattr(fp8, "quantize_both", fused)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    f = FP8Linear.from_linear(lin, emulate=True)
    x = torch.randn(530, 64, requires_grad=True)                # > one 512-token stats strip; wgrad pads to 640
    dy = torch.randn(530, 48)
    y = f(x)
    assert y.grad_fn.saved_tensors[0].shape == (64, 640)        # x^T codes: tokens padded to fp8.TOKEN_PAD
    y.backward(dy)
    fq = lambda t: dequantize_rowwise(*quantize_rowwise(t))    # noqa: E731
    w = lin.weight.detach()
    assert torch.equal(x.grad, fq(dy) @ fq(w.t().contiguous()).t())
    assert torch.equal(lin.weight.grad, fq(pad_tokens(dy.t())) @ fq(pad_tokens(x.detach().t())).t())
    assert torch.allclose(lin.bias.grad.double(), dy.double().sum(0), rtol=0, atol=1e-4)
