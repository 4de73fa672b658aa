"""NVFP4 reference quantizer in plain PyTorch (CPU or any device): the oracle every kernel must match.

Every step is a single fp32 operation with IEEE round-to-nearest-even, in the order written below, so a
kernel that performs the same operations produces the same bits. 1x16 quantization of `x [..., K]`:

  0. x = x.float(); non-finite input raises ValueError (NaN/Inf have no NVFP4 encoding; silently
     saturating them would hide diverged training). K must be a multiple of 16.
  1. optional random Hadamard transform (`hadamard.rht`) of every 16-block of the last dim.
  2. amax = max |x| (exact);  s_t = amax / 2688          (FP32 per-tensor decode scale, 2688 = 6 * 448)
  3. per block b: bmax = max |x_b| (exact)
  4.   denom = s_t * 6;  sb_f = min(bmax / denom, 448);  sb = e4m3_rne(sb_f)   (torch.float8_e4m3fn cast:
       round to nearest even, E4M3 subnormals kept; sb_f < 2**-10 becomes 0). If s_t == 0: sb = 0.
  5.   scale = float(sb) * s_t                              (the effective decode scale of the block)
  6.   y = x / scale  (y = 0 where scale == 0: all-zero blocks give scale 0 and code 0, never NaN)
  7.   code = e2m1(y): |y| clamped to 6 (saturation), rounded to the E2M1 grid by nearest-even
       (or stochastically, step 7'), sign bit = signbit(y) (a negative value that rounds to zero is
       -0, code 8, as the hardware cvt does; +0.0 is code 0).
  7'.  stochastic rounding: q = grid spacing at |y| (0.5 below 2, 1 below 4, 2 above), z = |y| / q
       (exact), round up iff u < z - floor(z) with u = r * 2**-24, r uniform in [0, 2**24): unbiased
       up to 2**-24 of a grid step (except where saturation clamps).
  8. pack two codes per byte, element 2i in the low nibble (the torch.float4_e2m1fn_x2 layout).

Dequantize: x_hat = (e2m1_value(code) * float(sb)) * s_t  (the first product is exact in fp32).
2D (16x16) blocks: as above with bmax over each 16x16 tile of a 2D tensor, so W and W^T quantize
identically (same tile amax, same per-element rounding). Scales are [M/16, K/16] then, [..., K/16] for 1x16.
"""
from __future__ import annotations

import functools

from typing import NamedTuple

import torch

from ..constants import (BLOCK, E2M1_MAX, E2M1_SIGN_BIT, E2M1_VALUES, E4M3_MAX, SR_BITS,
                         TENSOR_SCALE_DENOM)
from ..ieee import div_rn
from .hadamard import rht


class NVFP4Quantized(NamedTuple):
    """packed: uint8 [..., K/2] (two codes per byte, low nibble first); scales: float8_e4m3fn
    [..., K/16] (1x16) or [M/16, K/16] (16x16); tensor_scale: float32 0-dim decode scale."""

    packed: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor


# ----- element formats -------------------------------------------------------------------------------
def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15, one per element) -> float32 values (code 8 is -0.0)."""
    return _e2m1_table(codes.device)[codes.long() & 0xF]


@functools.lru_cache(maxsize=None)
def _e2m1_table(device: torch.device) -> torch.Tensor:
    # one table per device, made once: a host-to-device copy per call would break CUDA-graph capture
    return torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=device)


def e2m1_encode(y: torch.Tensor, rand: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 y (already divided by its scale) -> uint8 codes; nearest-even, or stochastic given `rand`
    (int32 in [0, 2**24), same shape). Magnitudes above 6 saturate to 6."""
    mag = y.abs().clamp(max=E2M1_MAX)
    # grid spacing: 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]; offset of the first code of each segment
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(torch.float32)
    base = torch.where(mag < 2, 0, torch.where(mag < 4, 2, 4))
    z = mag / step                                          # exact: step is a power of two
    if rand is None:
        k = torch.round(z)                                  # torch.round is round-half-to-even
    else:
        u = rand.to(torch.float32) * 2.0 ** -SR_BITS
        fl = torch.floor(z)
        k = fl + (u < z - fl).to(torch.float32)
    # k indexes the grid inside its segment: code = k + base (e.g. 5.0 -> z = 2.5 -> k = 2 -> code 6 = 4.0)
    codes = (k.to(torch.int32) + base).to(torch.uint8)
    return codes | (torch.signbit(y).to(torch.uint8) * E2M1_SIGN_BIT)


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 v <= 448 -> float8_e4m3fn by round-to-nearest-even (subnormals kept)."""
    return v.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K/2]; element 2i in bits 0-3, element 2i+1 in bits 4-7."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> uint8 codes [..., K] (inverse of `pack_codes`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def as_float4_x2(packed: torch.Tensor) -> torch.Tensor:
    """Zero-copy view of packed codes as torch.float4_e2m1fn_x2 (same byte layout)."""
    if not hasattr(torch, "float4_e2m1fn_x2"):
        raise RuntimeError(f"torch {torch.__version__} has no float4_e2m1fn_x2; use the uint8 packing directly")
    return packed.view(torch.float4_e2m1fn_x2)


def random_bits(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """int32 uniform in [0, 2**24): the random input of stochastic rounding."""
    return torch.randint(0, 2 ** SR_BITS, tuple(shape), generator=generator, dtype=torch.int32, device=device)


# ----- scales -----------------------------------------------------------------------------------------
def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """FP32 per-tensor decode scale amax / 2688 (step 2)."""
    return div_rn(x.float().abs().amax(), TENSOR_SCALE_DENOM)


def block_scales(bmax: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """Block amaxes (fp32) -> E4M3 block scales (step 4)."""
    if s_t.item() == 0:
        return torch.zeros_like(bmax).to(torch.float8_e4m3fn)
    denom = s_t * 6.0
    return e4m3_round(torch.clamp(bmax / denom, max=E4M3_MAX))


def _check(x: torch.Tensor, block_2d: bool) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"NVFP4 quantize: input has {bad} non-finite values (NaN/Inf); NVFP4 cannot encode them. "
                         "Fix the producer of this tensor (check for a diverged loss or overflow).")
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 quantize: last dim {x.shape[-1]} must be a multiple of {BLOCK}; pad it or keep "
                         "this layer in high precision (quant.keep_high_precision)")
    if block_2d and (x.ndim != 2 or x.shape[0] % BLOCK):
        raise ValueError(f"NVFP4 2D quantize needs a 2D tensor with both dims multiples of {BLOCK}, got "
                         f"{tuple(x.shape)}")


# ----- quantize / dequantize ------------------------------------------------------------------------
def quantize(x: torch.Tensor, *, block_2d: bool = False, rht_signs: torch.Tensor | None = None,
             rand: torch.Tensor | None = None, generator: torch.Generator | None = None,
             stochastic: bool = False, amax: torch.Tensor | None = None) -> NVFP4Quantized:
    """Quantize `x [..., K]` to NVFP4 (steps 0-8 of the module docstring).

    block_2d: 16x16 tiles (2D `x` only). rht_signs: [16] of +-1 applies the random Hadamard transform
    first (1x16 only). stochastic: round stochastically with `rand` (int32 [0, 2**24), shape of x) or
    bits drawn from `generator`. amax: use this tensor amax in step 2 instead of max |x| (e.g. the
    max over all tensor-parallel shards, so that every shard quantizes as the whole tensor would).
    """
    xf = x.float()
    _check(xf, block_2d)
    if rht_signs is not None:
        if block_2d:
            raise ValueError("NVFP4 quantize: RHT applies to 1x16 blocks only (activations/gradients)")
        xf = rht(xf, rht_signs)
    s_t = tensor_scale(xf) if amax is None else div_rn(amax.float().reshape(()), TENSOR_SCALE_DENOM)
    if block_2d:
        m, k = xf.shape
        tiles = xf.view(m // BLOCK, BLOCK, k // BLOCK, BLOCK)                # [M/16, 16, K/16, 16]
        sb = block_scales(tiles.abs().amax(dim=(1, 3)), s_t)                # [M/16, K/16]
        scale = (sb.float() * s_t)[:, None, :, None].expand_as(tiles).reshape(m, k)
    else:
        blocks = xf.unflatten(-1, (-1, BLOCK))                              # [..., K/16, 16]
        sb = block_scales(blocks.abs().amax(dim=-1), s_t)                   # [..., K/16]
        scale = (sb.float() * s_t).repeat_interleave(BLOCK, dim=-1)         # [..., K]
    y = torch.where(scale > 0, xf / torch.where(scale > 0, scale, 1.0), 0.0)
    if stochastic and rand is None:
        rand = random_bits(xf.shape, generator, xf.device)
    codes = e2m1_encode(y, rand if stochastic else None)
    return NVFP4Quantized(pack_codes(codes), sb, s_t)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize` (without the RHT): x_hat = (value * block_scale) * tensor_scale."""
    vals = e2m1_decode(unpack_codes(packed))                                # [..., K]
    sb = scales.float()
    if packed.ndim == 2 and sb.shape[0] * BLOCK == packed.shape[0] and sb.shape[0] != packed.shape[0]:
        sb = sb.repeat_interleave(BLOCK, dim=0)                             # 16x16 tiles -> rows
    out = (vals * sb.repeat_interleave(BLOCK, dim=-1)) * tensor_scale.float()
    return out.to(dtype)


def fake_quantize(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """dequantize(quantize(x)) in fp32 (RHT-transformed values if `rht_signs` is given)."""
    return dequantize(*quantize(x, **kwargs))
