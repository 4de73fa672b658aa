"""Tier (a): exact tables for the NVFP4 reference quantizer (quant/nvfp4/reference.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longlive.quant.constants import E2M1_VALUES
from megatron_longlive.quant.nvfp4 import hadamard as H
from megatron_longlive.quant.nvfp4 import reference as R

F32 = np.float32


def _e2m1_value_by_bits(code: int) -> float:
    """Independent decoding from the bit fields s e e m (bias 1, subnormal when e == 0)."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -mag if s else mag


def test_every_e2m1_code_decodes_by_its_bits_and_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = R.e2m1_decode(codes)
    assert vals.tolist() == [_e2m1_value_by_bits(c) for c in range(16)]
    assert torch.equal(R.e2m1_encode(vals), codes)          # -0.0 keeps its sign: code 8
    assert torch.signbit(vals[8]) and vals[8] == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ties_go_to_the_even_code_at_every_midpoint(sign):
    grid = list(E2M1_VALUES)
    for lo, hi in zip(grid[:-1], grid[1:]):
        mid = (lo + hi) / 2
        even = lo if grid.index(lo) % 2 == 0 else hi
        got = R.e2m1_decode(R.e2m1_encode(torch.tensor([sign * mid]))).item()
        assert got == sign * even, (mid, got)
        below, above = np.nextafter(F32(mid), F32(-1)), np.nextafter(F32(mid), F32(10))
        assert R.e2m1_decode(R.e2m1_encode(torch.tensor([sign * float(below)]))).item() == sign * lo
        assert R.e2m1_decode(R.e2m1_encode(torch.tensor([sign * float(above)]))).item() == sign * hi


def test_saturation_to_six():
    y = torch.tensor([6.0, 6.0001, 7.0, 100.0, 3.4e38, -6.5, -1e20])
    assert R.e2m1_decode(R.e2m1_encode(y)).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0]


def _e4m3_rne_f64(v: float) -> float:
    """Independent E4M3 rounding: quantum 2**(e-3) for normals (e >= -6), 2**-9 below; ties to even."""
    if v == 0:
        return 0.0
    e = max(int(np.floor(np.log2(v))), -6)
    q = 2.0 ** (e - 3)
    r = v / q
    n = np.floor(r)
    if r - n > 0.5 or (r - n == 0.5 and n % 2 == 1):
        n += 1
    return min(n * q, 448.0)


def test_e4m3_rounding_matches_independent_rne_including_subnormals_and_ties():
    vals = [2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -10 + 2.0 ** -20, 5 * 2.0 ** -10, 2.0 ** -6,
            2.0 ** -6 * (1 + 1 / 16), 1.0625, 1.1875, 447.0, 448.0, 300.0, 17.0, 0.0]
    rng = np.random.default_rng(0)
    vals += list(np.exp(rng.uniform(np.log(2.0 ** -11), np.log(448.0), 500)).astype(np.float32))
    t = torch.tensor(vals, dtype=torch.float32)
    got = R.e4m3_round(t).float().tolist()
    assert got == [_e4m3_rne_f64(float(v)) for v in t.tolist()]


def test_packing_low_nibble_first_and_float4_view():
    codes = torch.tensor([[1, 2, 15, 8, 0, 7]], dtype=torch.uint8)
    packed = R.pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x8F, 0x70]]
    assert torch.equal(R.unpack_codes(packed), codes)
    if hasattr(torch, "float4_e2m1fn_x2"):
        f4 = R.as_float4_x2(packed)
        assert f4.dtype == torch.float4_e2m1fn_x2 and f4.shape == packed.shape
        assert torch.equal(f4.view(torch.uint8), packed)


def test_all_zero_blocks_have_zero_scale_and_no_nan():
    x = torch.randn(3, 64)
    x[1, 16:32] = 0
    q = R.quantize(x)
    assert q.scales[1, 1].float() == 0
    assert torch.all(R.unpack_codes(q.packed)[1, 16:32] == 0)
    xh = R.dequantize(*q)
    assert torch.isfinite(xh).all() and torch.all(xh[1, 16:32] == 0)
    z = R.quantize(torch.zeros(2, 32))
    assert z.tensor_scale == 0 and torch.all(z.packed == 0) and torch.all(z.scales.float() == 0)
    assert torch.equal(R.dequantize(*z), torch.zeros(2, 32))
    z2 = R.quantize(torch.zeros(32, 32), block_2d=True)
    assert torch.equal(R.dequantize(*z2), torch.zeros(32, 32))


def _quantize_block_by_hand(block: np.ndarray, amax: float) -> tuple[float, list[float]]:
    """float64 / numpy-fp32 re-derivation of one 1x16 block: (block scale, dequantized values)."""
    s_t = F32(F32(amax) / F32(2688.0))
    sb_f = min(F32(F32(np.abs(block).max()) / F32(s_t * F32(6.0))), F32(448.0))
    sb = _e4m3_rne_f64(float(sb_f))
    scale = F32(F32(sb) * s_t)
    grid = np.array(E2M1_VALUES)
    out = []
    for v in block.astype(np.float32):
        y = min(abs(float(F32(v) / scale)), 6.0) if scale > 0 else 0.0
        d = np.abs(grid - y)
        cands = np.flatnonzero(d == d.min())
        idx = cands[0] if len(cands) == 1 else [c for c in cands if c % 2 == 0][0]
        out.append(float(F32(F32(grid[idx] * sb) * s_t)) * (-1 if v < 0 else 1))
    return sb, out


def test_blocks_match_a_hand_derivation_in_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 48, generator=g) * torch.tensor([1.0, 1e-3, 30.0])[None].repeat_interleave(16, 1)
    x[2, 0] = 500.0                     # tensor amax: makes the 1e-3 blocks use subnormal E4M3 scales
    q = R.quantize(x)
    xh = R.dequantize(*q)
    amax = float(x.abs().max())
    for r in range(4):
        for b in range(3):
            sb, vals = _quantize_block_by_hand(x[r, 16 * b:16 * (b + 1)].numpy(), amax)
            assert q.scales[r, b].float().item() == sb
            assert xh[r, 16 * b:16 * (b + 1)].tolist() == vals


def test_denormal_e4m3_block_scales():
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0                   # s_t = 1: block scale = block amax / 6
    x[0, 16:32] = torch.linspace(-0.01, 0.012, 16)   # block amax 0.012 -> sb_f = 0.002 < 2**-6
    q = R.quantize(x)
    bits = q.scales.view(torch.uint8)[0, 1].item()
    assert bits >> 3 == 0 and bits & 7 != 0, f"expected a subnormal E4M3 scale, got bits {bits:#04x}"
    assert q.scales[0, 1].float().item() == _e4m3_rne_f64(0.012 / 6)
    sb, vals = _quantize_block_by_hand(x[0, 16:].numpy(), 2688.0)
    assert R.dequantize(*q)[0, 16:].tolist() == vals


def test_saturation_inside_quantize_when_scale_rounds_down():
    # block amax 6 * 1.0625 rounds to scale 1.0 (ties-to-even in E4M3) -> y = 6.375 saturates to 6
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0
    x[0, 16] = 6.0 * 1.0625
    q = R.quantize(x)
    assert q.scales[0, 1].float().item() == 1.0
    assert R.dequantize(*q)[0, 16].item() == 6.0


def test_2d_blocks_quantize_w_and_wt_identically():
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 3, 32)
    q, qt = R.quantize(w, block_2d=True), R.quantize(w.t().contiguous(), block_2d=True)
    assert q.scales.shape == (3, 2)
    assert torch.equal(q.scales.float(), qt.scales.float().t())
    assert torch.equal(R.dequantize(*q), R.dequantize(*qt).t())
    # a 16x16 tile shares one scale: each tile's amax maps to at most 6 * scale
    sb = q.scales.float().repeat_interleave(16, 0).repeat_interleave(16, 1) * q.tensor_scale
    assert torch.all(R.dequantize(*q).abs() <= 6 * sb)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(2, 32)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        R.quantize(x)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 16"):
        R.quantize(torch.randn(4, 24))
    with pytest.raises(ValueError, match="2D quantize"):
        R.quantize(torch.randn(24, 32), block_2d=True)


def test_stochastic_rounding_reference_is_unbiased_and_on_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=g)
    draws = torch.stack([R.fake_quantize(x, stochastic=True, generator=g) for _ in range(2000)])
    q = R.quantize(x)
    q_rne = R.dequantize(*q)
    scale = q.scales.float().repeat_interleave(16, -1) * q.tensor_scale
    inside = x.abs() <= 6 * scale        # values beyond 6 * scale saturate (documented bias), excluded
    assert inside.sum() >= 56
    err = (draws.mean(0) - x).abs()[inside]
    # the per-element standard error is <= spacing / 2 / sqrt(2000) <= 0.023 scale; allow ~5 sigma
    assert torch.all(err < 0.12 * scale[inside]), (err / scale[inside]).max()
    assert (q_rne - x).abs()[inside].max() > 4 * err.max()  # RNE is biased per element, SR is not
    assert torch.all(draws[:, ~inside] == q_rne[~inside])    # saturated values are deterministic
    # every stochastic draw lands on one of the two neighbours of the value
    lo, hi = draws.min(0).values, draws.max(0).values
    assert torch.all(lo[inside] <= x[inside] + 1e-6) and torch.all(hi[inside] >= x[inside] - 1e-6)
    assert torch.all(hi - lo <= 2 * scale + 1e-6)


def test_rht_orthogonal_and_butterfly_equals_matrix():
    m = H.rht_matrix(7)
    assert torch.allclose(m @ m.T, torch.eye(16, dtype=torch.float64), atol=1e-15)
    hm = H.hadamard_matrix(16)
    assert torch.equal(hm, hm.T) and torch.equal(hm @ hm, 16 * torch.eye(16, dtype=torch.float64))
    x = torch.randn(5, 32, dtype=torch.float64)
    signs = H.rht_signs(7).double()
    assert torch.allclose(H.rht(x, signs), (x.view(5, 2, 16) @ m).view(5, 32), atol=1e-12)
    assert torch.allclose(H.inverse_rht(H.rht(x, signs), signs), x, atol=1e-12)


def test_rht_signs_depend_only_on_seed():
    a = H.rht_signs(11)
    torch.manual_seed(123)
    torch.rand(10)
    b = H.rht_signs(11)             # another "rank" with a different global RNG state
    assert torch.equal(a, b) and set(a.tolist()) <= {-1.0, 1.0}
    assert not torch.equal(H.rht_signs(11), H.rht_signs(12))
    state = torch.get_rng_state()
    H.rht_signs(5)
    assert torch.equal(state, torch.get_rng_state())   # the global RNG is not advanced


def test_rht_preserves_the_wgrad_product():
    g = torch.Generator().manual_seed(2)
    dy, x = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    s = H.rht_signs(1).double()
    dyt, xt = H.rht(dy.T.contiguous(), s), H.rht(x.T.contiguous(), s)
    assert torch.allclose(dyt @ xt.T, dy.T @ x, atol=1e-12)


def test_shared_amax_makes_a_shard_quantize_like_its_part_of_the_whole():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    x[0, 40] = 9.0                                       # the tensor amax lives in the second half
    whole = R.quantize(x)
    half = R.quantize(x[:, :32].contiguous(), amax=x.abs().amax())
    assert torch.equal(half.packed, whole.packed[:, :16]) and torch.equal(half.scales.float(), whole.scales[:, :2].float())
    assert not torch.equal(R.quantize(x[:, :32].contiguous()).scales.float(), whole.scales[:, :2].float())
