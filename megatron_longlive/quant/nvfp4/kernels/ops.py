"""torch.library custom ops around the Triton NVFP4 kernels (with fake impls, so torch.compile traces them).

  megatron_longlive::nvfp4_quantize(x [M, K], signs?, rand?, seed, sr_mode, block_2d) -> (packed, scales, ts)
  megatron_longlive::nvfp4_dequantize(packed, scales, ts, block_2d, dtype) -> x_hat [M, K]

`quantize` / `dequantize` below are the user-facing wrappers: any leading dims, input validation, the
same `NVFP4Quantized` result as reference.quantize, and bit-identical codes and scales. On a machine
without CUDA the kernels only run under TRITON_INTERPRET=1 (set before this module is imported).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ...constants import BLOCK
from ..reference import NVFP4Quantized
from .dequantize_triton import dequantize_kernel
from .quantize_triton import (SR_BITS, SR_NONE, SR_PHILOX, amax_kernel, philox_bits_kernel,
                              quantize_16x16_kernel, quantize_1x16_kernel)

BR, BK = 32, 128          # tile of the 1x16 kernels (rows x columns)
BR2, BK2 = 32, 64         # tile of the 16x16 kernel


def _grid(m: int, k: int, br: int, bk: int) -> tuple[int, int]:
    return triton.cdiv(m, br), triton.cdiv(k, bk)


@torch.library.custom_op("megatron_longlive::nvfp4_quantize", mutates_args=())
def nvfp4_quantize(x: torch.Tensor, signs: Optional[torch.Tensor], rand: Optional[torch.Tensor], seed: int,
                   sr_mode: int, block_2d: bool, amax: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(m // BLOCK if block_2d else m, k // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
    ts = torch.empty((), dtype=torch.float32, device=x.device)
    use_rht = signs is not None
    grid = _grid(m, k, BR, BK)
    if amax is None:            # first pass: amax of the (transformed) tensor, reduced without a host sync
        partial = torch.empty(grid, dtype=torch.float32, device=x.device)
        amax_kernel[grid](x, signs if use_rht else x, partial, m, k, USE_RHT=use_rht, BR=BR, BK=BK)
        amax = partial.amax()
    amax = amax.to(torch.float32).reshape(()).contiguous()
    if block_2d:
        quantize_16x16_kernel[_grid(m, k, BR2, BK2)](x, amax, packed, scales.view(torch.uint8), ts, m, k,
                                                     BR=BR2, BK=BK2)
    else:
        quantize_1x16_kernel[grid](x, signs if use_rht else x, rand if sr_mode == SR_BITS else x, amax, packed,
                                   scales.view(torch.uint8), ts, seed, m, k, USE_RHT=use_rht, SR=sr_mode,
                                   BR=BR, BK=BK)
    return packed, scales, ts


@nvfp4_quantize.register_fake
def _(x, signs, rand, seed, sr_mode, block_2d, amax=None):
    m, k = x.shape
    return (x.new_empty(m, k // 2, dtype=torch.uint8),
            x.new_empty(m // BLOCK if block_2d else m, k // BLOCK, dtype=torch.float8_e4m3fn),
            x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("megatron_longlive::nvfp4_dequantize", mutates_args=())
def nvfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, ts: torch.Tensor, block_2d: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    m, k = packed.shape[0], packed.shape[1] * 2
    bf16 = dtype == torch.bfloat16
    out = torch.empty(m, k, dtype=torch.bfloat16 if bf16 else torch.float32, device=packed.device)
    dequantize_kernel[_grid(m, k, BR, BK)](packed, scales.view(torch.uint8), ts,
                                           out.view(torch.int16) if bf16 else out, m, k,
                                           ROWS_PER_SCALE=BLOCK if block_2d else 1, OUT_BF16=bf16, BR=BR, BK=BK)
    return out if out.dtype == dtype else out.to(dtype)


@nvfp4_dequantize.register_fake
def _(packed, scales, ts, block_2d, dtype):
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)


# ----- wrappers ---------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, *, block_2d: bool = False, rht_signs: torch.Tensor | None = None,
             rand: torch.Tensor | None = None, seed: int | None = None, stochastic: bool = False,
             check_finite: bool = True, amax: torch.Tensor | None = None) -> NVFP4Quantized:
    """Same contract as reference.quantize; stochastic rounding takes `rand` bits or a Philox `seed`.

    check_finite=True raises ValueError on NaN/Inf (one host sync); with False, non-finite input gives
    unspecified codes (the kernels do not trap). `amax`: the tensor's max |value| (after the RHT) when
    the caller already has it (e.g. fused into the producing op); skips the first pass over x. It must be
    exact for the result to equal the reference."""
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("NVFP4 quantize: input has non-finite values (NaN/Inf); NVFP4 cannot encode them")
    if x.shape[-1] % BLOCK or (block_2d and (x.ndim != 2 or x.shape[0] % BLOCK)):
        raise ValueError(f"NVFP4 quantize: shape {tuple(x.shape)} is not a multiple of {BLOCK} in the blocked dims")
    if block_2d and (rht_signs is not None or stochastic):
        raise ValueError("NVFP4 quantize: 16x16 blocks take neither RHT nor stochastic rounding")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    sr_mode = SR_NONE
    if stochastic:
        if rand is None and seed is None:
            raise ValueError("NVFP4 quantize: stochastic rounding needs `rand` bits or a Philox `seed`")
        sr_mode = SR_BITS if rand is not None else SR_PHILOX
    signs = rht_signs.to(x.device, torch.float32).contiguous() if rht_signs is not None else None
    rand2 = rand.reshape(-1, k).to(torch.int32).contiguous() if sr_mode == SR_BITS else None
    packed, scales, ts = torch.ops.megatron_longlive.nvfp4_quantize(x2, signs, rand2, int(seed or 0), sr_mode,
                                                                    block_2d, amax)
    if not block_2d:
        packed, scales = packed.view(*lead, k // 2), scales.view(*lead, k // BLOCK)
    return NVFP4Quantized(packed, scales, ts)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same contract as reference.dequantize."""
    lead, k2 = packed.shape[:-1], packed.shape[-1]
    block_2d = packed.ndim == 2 and scales.shape[0] != packed.shape[0]
    out = torch.ops.megatron_longlive.nvfp4_dequantize(packed.reshape(-1, k2).contiguous(),
                                                       scales.reshape(-1, scales.shape[-1]).contiguous(),
                                                       tensor_scale, block_2d, dtype)
    return out.view(*lead, 2 * k2)


def philox_bits(seed: int, shape, device) -> torch.Tensor:
    """int32 [.., K] bits in [0, 2**24): exactly those quantize(stochastic=True, seed=seed) draws."""
    k = shape[-1]
    m = 1
    for d in shape[:-1]:
        m *= d
    out = torch.empty(m, k, dtype=torch.int32, device=device)
    philox_bits_kernel[_grid(m, k, BR, BK)](out, seed, m, k, BR=BR, BK=BK)
    return out.view(*shape)
