"""GPU lane: compiled Triton NVFP4 kernels bitwise equal to the CPU reference; FP8 scaled-mm linear vs emulation.

Run through `device`: python -m pytest -q -m gpu tests/gpu/test_nvfp4_gpu.py
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.gpu.gpu_helpers import bytes_differ

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]




def _assert_same(q, ref, what):
    for name, g, w in zip(("codes", "scales", "tensor scale"), q, ref):
        msg = bytes_differ(g, w)
        assert msg.startswith("0 of"), f"{what} {name}: {msg}"


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    mags = torch.tensor([1.0, 1e-4, 40.0, 0.0, 3.0])
    x = x * mags[torch.arange(shape[-1] // 16) % 5].repeat_interleave(16)
    x.view(-1, shape[-1])[0, 0] = 2688.0
    return x


@pytest.mark.parametrize("shape", [(1000, 1536), (257, 8960)])
def test_quantize_kernels_bitwise_vs_reference(shape):
    from megatron_longlive.quant.nvfp4 import hadamard as H
    from megatron_longlive.quant.nvfp4 import reference as R
    from megatron_longlive.quant.nvfp4.kernels import ops

    x = _data(shape)
    xc = x.cuda().to(torch.bfloat16)
    xr = xc.cpu()
    _assert_same(ops.quantize(xc), R.quantize(xr), "1x16")
    s = H.rht_signs(3)
    _assert_same(ops.quantize(xc, rht_signs=s), R.quantize(xr, rht_signs=s), "1x16 rht")
    bits = ops.philox_bits(77, xc.shape, xc.device)
    _assert_same(ops.quantize(xc, stochastic=True, seed=77, rht_signs=s),
                 R.quantize(xr, stochastic=True, rand=bits.cpu(), rht_signs=s), "1x16 rht+sr")
    m = shape[0] // 16 * 16
    _assert_same(ops.quantize(xc[:m], block_2d=True), R.quantize(xr[:m], block_2d=True), "16x16")
    q = R.quantize(xr[:m], block_2d=True)
    for dtype in (torch.float32, torch.bfloat16):
        got = ops.dequantize(*(t.cuda() for t in q), dtype=dtype)
        msg = bytes_differ(got, R.dequantize(*q, dtype=dtype))
        assert msg.startswith("0 of"), f"dequantize {dtype}: {msg}"


@pytest.mark.parametrize("block_2d", [False, True])
def test_quantize_near_rounding_boundaries_bitwise(block_2d):
    """~4M fp32 values within 3 ulp of every E2M1 boundary of their block, block scales over the whole
    E4M3 range: the per-block reciprocal + fused Markstein correction round exactly like x / scale; also
    the tiny-amax (plain division) path, the caller-given amax and the amax kernel."""
    from megatron_longlive.quant.nvfp4 import reference as R
    from megatron_longlive.quant.nvfp4.kernels import ops
    from tests.nvfp4_cases import near_boundary_data

    x = near_boundary_data(2048, 2048, seed=21, block_2d=block_2d)
    xc = x.cuda()
    ref = R.quantize(x, block_2d=block_2d)
    _assert_same(ops.quantize(xc, block_2d=block_2d), ref, "near boundaries")
    _assert_same(ops.quantize(xc, block_2d=block_2d, amax=ops.tensor_amax(xc)), ref, "near boundaries, amax given")
    assert ops.tensor_amax(xc).item() == x.abs().amax().item()
    tiny = x[:256] * 2.0 ** -100
    _assert_same(ops.quantize(tiny.cuda(), block_2d=block_2d), R.quantize(tiny, block_2d=block_2d), "tiny amax")


@pytest.mark.parametrize("shape", [(1000, 1552), (33, 48), (1027, 3072)])
def test_ragged_shapes_bitwise_and_dequantize(shape):
    """Odd numbers of 16-blocks per row, rows not a multiple of any tile; bf16 and fp32 input; dequantize."""
    from megatron_longlive.quant.nvfp4 import hadamard as H
    from megatron_longlive.quant.nvfp4 import reference as R
    from megatron_longlive.quant.nvfp4.kernels import ops

    x = _data(shape, seed=5)
    for src in (x.to(torch.bfloat16), x):
        ref = R.quantize(src)
        q = ops.quantize(src.cuda())
        _assert_same(q, ref, f"1x16 {src.dtype}")
        s = H.rht_signs(9)
        _assert_same(ops.quantize(src.cuda(), rht_signs=s), R.quantize(src, rht_signs=s), f"1x16 rht {src.dtype}")
        for dtype in (torch.float32, torch.bfloat16):
            msg = bytes_differ(ops.dequantize(*q, dtype=dtype), R.dequantize(*ref, dtype=dtype))
            assert msg.startswith("0 of"), f"dequantize 1x16 {dtype}: {msg}"


def test_quantize_compiles_with_inductor():
    from megatron_longlive.quant.nvfp4 import reference as R
    from megatron_longlive.quant.nvfp4.kernels import ops

    x = _data((256, 512)).cuda()

    @torch.compile(fullgraph=True)
    def fq(t):
        return ops.dequantize(*ops.quantize(t * 2, check_finite=False))

    assert torch.equal(fq(x).cpu(), R.fake_quantize(x.cpu() * 2))


def test_nvfp4_linear_gpu_matches_cpu_reference_path():
    from megatron_longlive.quant.nvfp4.linear import NVFP4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    x = torch.randn(64, 256)
    cpu = NVFP4Linear.from_linear(lin, rht=True, stochastic_rounding=False)
    gpu = NVFP4Linear.from_linear(copy.deepcopy(lin).cuda(), rht=True, stochastic_rounding=False)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    assert torch.allclose(yc, yg.cpu(), rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(yc)
    yc.backward(dy)
    yg.backward(dy.cuda())
    assert torch.allclose(xc.grad, xg.grad.cpu(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(cpu.weight.grad, gpu.weight.grad.cpu(), rtol=1e-4, atol=1e-4)


def test_fp8_linear_scaled_mm_matches_emulation():
    from megatron_longlive.quant.fp8 import FP8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 scaled-mm needs sm89+")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 512).cuda().to(torch.bfloat16)
    x = torch.randn(256, 1536, device="cuda", dtype=torch.bfloat16)
    fast = FP8Linear.from_linear(lin, emulate=False)
    emu = FP8Linear.from_linear(copy.deepcopy(lin), emulate=True)      # own parameters: grads not shared
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, ye = fast(xf), emu(xe)
    dy = torch.randn_like(yf)
    yf.backward(dy)
    ye.backward(dy)
    for name, a, b in (("y", yf, ye), ("dx", xf.grad, xe.grad), ("dw", fast.weight.grad, emu.weight.grad)):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2, (name, err.item())


def test_packed_linear_on_gpu_equals_cpu_and_saves_memory():
    from megatron_longlive.quant.nvfp4.packed import PackedNVFP4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 8960).to(torch.bfloat16)
    cpu = PackedNVFP4Linear.from_linear(lin)
    gpu = PackedNVFP4Linear.from_linear(copy.deepcopy(lin).cuda())
    for name in ("codes", "scales", "tensor_scale"):
        msg = bytes_differ(getattr(gpu, name), getattr(cpu, name))
        assert msg.startswith("0 of"), f"packed {name}: {msg}"
    x = torch.randn(64, 1536, dtype=torch.bfloat16)
    w = cpu.dequantized_weight(torch.bfloat16)
    assert torch.equal(gpu.dequantized_weight(torch.bfloat16).cpu(), w)
    y = gpu(x.cuda())
    assert torch.allclose(y.float().cpu(), torch.nn.functional.linear(x, w, cpu.bias).float(), rtol=2e-2, atol=2e-2)
    assert gpu.packed_bytes() <= 0.3 * 2 * 1536 * 8960


def test_philox_stochastic_rounding_unbiased_on_gpu():
    from megatron_longlive.quant.nvfp4.kernels import ops

    g = torch.Generator().manual_seed(7)
    row = torch.randn(1, 64, generator=g)
    row[0, ::16] = 4.0                                  # every block amax = tensor amax: no saturation
    n = 1 << 16
    q = ops.quantize(row.cuda().repeat(n, 1), stochastic=True, seed=11)
    xh = ops.dequantize(*q).cpu()
    scale = (q.scales.float().cpu()[0] * q.tensor_scale.cpu()).repeat_interleave(16)
    bias = ((xh.mean(0) - row[0]) / scale).abs().max()
    assert bias < 5 * 0.5 / n ** 0.5, bias


def test_fused_fp8_quantize_both_bitwise_vs_cpu():
    from megatron_longlive.quant.fp8 import pad_tokens, quantize_rowwise
    from megatron_longlive.quant.fp8_triton import quantize_both

    x = _data((1000, 1536)).to(torch.bfloat16)
    got = quantize_both(x.cuda())
    rq, rs = quantize_rowwise(x)
    rq_t, rs_t = quantize_rowwise(pad_tokens(x.t()))
    for name, g, w in zip(("codes", "scales", "codes^T", "scales^T"), got, (rq, rs, rq_t.contiguous(), rs_t)):
        msg = bytes_differ(g, w)
        assert msg.startswith("0 of"), f"fp8 {name}: {msg}"
