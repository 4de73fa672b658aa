"""Tier (b): Triton kernels (NVFP4, and the fused FP8 quantizer) bitwise equal to their references, run
by the Triton interpreter on CPU.

TRITON_INTERPRET must be set when the kernels are decorated (at import) and while they run (triton
reads it lazily), so it is set here before importing them and left set.
Shapes are small (the interpreter is slow) but cover partial tiles in both dims.
"""
from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - the GPU lane runs tests/gpu/test_nvfp4_gpu.py compiled
    pytest.skip("interpreter tests run on CPU machines (setting TRITON_INTERPRET here would slow the GPU lane)",
                allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"

from megatron_longlive.quant import fp8_triton  # noqa: E402
from megatron_longlive.quant.fp8 import pad_tokens, quantize_rowwise  # noqa: E402
from megatron_longlive.quant.nvfp4 import hadamard as H  # noqa: E402
from megatron_longlive.quant.nvfp4 import reference as R  # noqa: E402
from megatron_longlive.quant.nvfp4.kernels import ops  # noqa: E402
from megatron_longlive.quant.nvfp4.kernels.quantize_triton import FAST_DIV_MIN_TS, quantize_1x16_kernel  # noqa: E402
from tests.nvfp4_cases import near_boundary_data  # noqa: E402


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    for kernel in (quantize_1x16_kernel, fp8_triton._quantize_kernel):
        assert isinstance(kernel, InterpretedFunction), \
            "triton kernels were imported before TRITON_INTERPRET=1 was set; run this module alone"


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    a = got.reshape(-1).contiguous().view(torch.uint8)
    b = want.reshape(-1).contiguous().view(torch.uint8)
    k = int((a != b).sum())
    assert k == 0, f"{what}: {k} of {a.numel()} bytes differ"


def assert_same(q, ref, what):
    assert_bytes_equal(q.packed, ref.packed, f"{what} codes")
    assert_bytes_equal(q.scales, ref.scales, f"{what} scales")
    assert_bytes_equal(q.tensor_scale.reshape(()), ref.tensor_scale.reshape(()), f"{what} tensor scale")


def _data(shape, seed=0):
    """Gaussian blocks of very different magnitudes (normal, subnormal-scale and zero blocks) and exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    mags = torch.tensor([1.0, 1e-4, 40.0, 0.0, 3.0])
    k = shape[-1] // 16
    x = x * mags[torch.arange(k) % len(mags)].repeat_interleave(16)
    flat = x.view(-1, shape[-1])
    flat[0, :16] = torch.tensor([2688.0, 1344, 0.25 * 448, 0.75 * 448, 1.25 * 448, 1.75 * 448, 2.5 * 448,
                                 3.5 * 448, 5 * 448, -0.0, -1e-30, 6.5 * 448, 224, -672, 1e-3, 7.0])
    return x


@pytest.mark.parametrize("shape", [(40, 144), (2, 3, 64)])
def test_quantize_1x16_bitwise(shape):
    x = _data(shape)
    assert_same(ops.quantize(x), R.quantize(x), "1x16")
    xb = x.to(torch.bfloat16)
    assert_same(ops.quantize(xb), R.quantize(xb), "1x16 bf16 input")


def test_quantize_1x16_rht_bitwise():
    x = _data((33, 96), seed=1)
    s = H.rht_signs(5)
    ref = R.quantize(x, rht_signs=s)
    assert_same(ops.quantize(x, rht_signs=s), ref, "1x16 rht")
    amax = H.rht(x, s).abs().amax()                       # a caller-provided amax skips the first pass
    assert_same(ops.quantize(x, rht_signs=s, amax=amax), ref, "1x16 rht, amax given")


def test_quantize_stochastic_bitwise_given_bits_and_philox():
    x = _data((17, 80), seed=2)
    bits = R.random_bits(x.shape, torch.Generator().manual_seed(9))
    assert_same(ops.quantize(x, stochastic=True, rand=bits), R.quantize(x, stochastic=True, rand=bits), "sr bits")
    s = H.rht_signs(3)
    assert_same(ops.quantize(x, stochastic=True, rand=bits, rht_signs=s),
                R.quantize(x, stochastic=True, rand=bits, rht_signs=s), "sr bits + rht")
    pbits = ops.philox_bits(1234, x.shape, x.device)
    assert pbits.min() >= 0 and pbits.max() < 2 ** 24
    assert_same(ops.quantize(x, stochastic=True, seed=1234), R.quantize(x, stochastic=True, rand=pbits), "sr philox")


@pytest.mark.parametrize("shape", [(48, 96), (16, 16)])
def test_quantize_16x16_bitwise(shape):
    x = _data(shape, seed=4)
    assert_same(ops.quantize(x, block_2d=True), R.quantize(x, block_2d=True), "16x16")


@pytest.mark.parametrize("block_2d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_bitwise(block_2d, dtype):
    q = R.quantize(_data((48, 96), seed=5), block_2d=block_2d)
    assert_bytes_equal(ops.dequantize(*q, dtype=dtype), R.dequantize(*q, dtype=dtype), f"dequantize {dtype}")


@pytest.mark.parametrize("shape", [(37, 48), (5, 16), (3, 7, 80), (9, 272)])
def test_quantize_1x16_ragged_shapes_bitwise(shape):
    """Rows not a multiple of any tile, odd numbers of 16-blocks per row, partial last program; fp32,
    bf16 and fp16 input; a caller-given amax; dequantize of the result."""
    x = _data(shape, seed=11)
    for src in (x, x.to(torch.bfloat16), x.to(torch.float16)):
        ref = R.quantize(src)
        assert_same(ops.quantize(src), ref, f"1x16 {src.dtype}")
        assert_same(ops.quantize(src, amax=src.float().abs().amax()), ref, f"1x16 {src.dtype} amax given")
        for dtype in (torch.float32, torch.bfloat16):
            assert_bytes_equal(ops.dequantize(*ref, dtype=dtype), R.dequantize(*ref, dtype=dtype),
                               f"dequantize {shape} {dtype}")


@pytest.mark.parametrize("block_2d", [False, True])
def test_quantize_near_rounding_boundaries_bitwise(block_2d):
    """Values within 3 ulp of every E2M1 boundary of their block (block scales over the E4M3 range):
    the per-block reciprocal + Markstein correction must round every quotient exactly like x / scale."""
    x = near_boundary_data(128, 272, seed=3, block_2d=block_2d)
    assert_same(ops.quantize(x, block_2d=block_2d), R.quantize(x, block_2d=block_2d), "near boundaries")
    tiny = x * 2.0 ** -100                                 # s_t < FAST_DIV_MIN_TS: the plain-division path
    assert float(tiny.abs().amax()) / 2688 < FAST_DIV_MIN_TS
    assert_same(ops.quantize(tiny, block_2d=block_2d), R.quantize(tiny, block_2d=block_2d), "tiny amax")


@pytest.mark.slow
@pytest.mark.parametrize("block_2d", [False, True])
def test_quantize_near_rounding_boundaries_1m_values(block_2d):
    """The boundary test at ~1M values (~6 s each in the interpreter)."""
    x = near_boundary_data(4096, 256, seed=17, block_2d=block_2d)
    assert_same(ops.quantize(x, block_2d=block_2d), R.quantize(x, block_2d=block_2d), "near boundaries, 1M")


@pytest.mark.parametrize("shape", [(48, 272), (80, 32)])
def test_quantize_16x16_partial_tiles_bitwise(shape):
    x = _data(shape, seed=12)
    for src in (x, x.to(torch.bfloat16)):
        ref = R.quantize(src, block_2d=True)
        assert_same(ops.quantize(src, block_2d=True), ref, f"16x16 {src.dtype}")
        assert_bytes_equal(ops.dequantize(*ref, dtype=torch.bfloat16), R.dequantize(*ref, dtype=torch.bfloat16),
                           "dequantize 16x16 bf16")


def test_tensor_amax_kernel():
    """One atomic_max per program of fp32 bits: the exact max |x| (and of RHT(x)), any dtype, partial tiles."""
    x = _data((37, 48), seed=13)
    s = H.rht_signs(2)
    for src in (x, x.to(torch.bfloat16)):
        assert ops.tensor_amax(src).item() == src.float().abs().amax().item()
        assert ops.tensor_amax(src, s).item() == H.rht(src.float(), s).abs().amax().item()


def test_all_zero_tensor_and_non_finite_input():
    z = torch.zeros(16, 32)
    assert_same(ops.quantize(z), R.quantize(z), "zeros")
    assert torch.equal(ops.dequantize(*ops.quantize(z)), z)
    x = torch.randn(16, 32)
    x[3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ops.quantize(x)


def test_rht_cross_rank_consistency_in_kernel():
    """Two 'ranks' build the signs from the same seed under different global RNG states: same bytes."""
    x = _data((16, 64), seed=6)
    torch.manual_seed(0)
    a = ops.quantize(x, rht_signs=H.rht_signs(42))
    torch.manual_seed(99)
    torch.rand(7)
    b = ops.quantize(x, rht_signs=H.rht_signs(42))
    assert_same(a, b, "rank0 vs rank1")
    # and the transform is orthogonal: undoing it recovers x up to the quantization error
    xr = H.inverse_rht(ops.dequantize(*a), H.rht_signs(42))
    assert (xr - x).norm() / x.norm() < 0.2


def test_philox_stochastic_rounding_is_unbiased():
    """Mean over 1024 independent draws (rows of one call, fixed seed) -> x; the error shrinks like 1/sqrt(n)."""
    g = torch.Generator().manual_seed(7)
    row = torch.randn(1, 32, generator=g)
    row[0, 0], row[0, 16] = 4.0, -4.0                # block amax = tensor amax: y <= 6, no saturation
    n = 1024
    x = row.repeat(n, 1)
    q = ops.quantize(x, stochastic=True, seed=2024)
    xh = ops.dequantize(*q)
    scale = (q.scales.float()[0] * q.tensor_scale).repeat_interleave(16)
    bias = (xh.mean(0) - row[0]) / scale             # in units of the block scale
    spread = (xh.std(0) / scale).max()
    assert spread > 0.05                              # draws really differ
    assert bias.abs().max() < 5 * 0.5 / n ** 0.5, bias.abs().max()
    rne = (R.fake_quantize(row)[0] - row[0]) / scale
    assert rne.abs().max() > 5 * bias.abs().max()


def test_custom_ops_fake_impls_and_compile():
    x = _data((16, 64), seed=8)
    s = H.rht_signs(1)
    torch.library.opcheck(torch.ops.megatron_longlive.nvfp4_quantize.default, (x, s, None, 0, 0, False),
                          test_utils=("test_faketensor",))
    q = ops.quantize(x)
    torch.library.opcheck(torch.ops.megatron_longlive.nvfp4_dequantize.default,
                          (q.packed, q.scales, q.tensor_scale, False, torch.float32),
                          test_utils=("test_faketensor",))

    def fq(t):
        return ops.dequantize(*ops.quantize(t, check_finite=False))

    compiled = torch.compile(fq, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), R.fake_quantize(x))


@pytest.mark.parametrize("shape", [(70, 48), (16, 32)])
def test_fused_fp8_quantize_both_bitwise(shape):
    """Rowwise E4M3 of t and of pad(t^T) in one fused pass pair == quantize_rowwise twice."""
    g = torch.Generator().manual_seed(10)
    t = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1])[None]
    t[1] = 0.0                                     # an all-zero row: scale 1
    t[2, :3] = torch.tensor([-0.0, 1e-30, -5e-7])  # signed zero, flushed tiny values
    for src in (t, t.to(torch.bfloat16)):
        q, s, q_t, s_t = fp8_triton.quantize_both(src)
        rq, rs = quantize_rowwise(src)
        rq_t, rs_t = quantize_rowwise(pad_tokens(src.t()))
        assert_bytes_equal(q, rq, "fp8 rowwise codes")
        assert_bytes_equal(s, rs, "fp8 rowwise scales")
        assert_bytes_equal(q_t, rq_t.contiguous(), "fp8 transposed codes")
        assert_bytes_equal(s_t, rs_t, "fp8 transposed scales")
