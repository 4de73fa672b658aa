"""torch.library custom ops around the Triton NVFP4 kernels (with fake impls, so torch.compile traces them).

  megatron_longlive::nvfp4_quantize(x [M, K], signs?, rand?, seed, sr_mode, block_2d) -> (packed, scales, ts)
  megatron_longlive::nvfp4_dequantize(packed, scales, ts, block_2d, dtype) -> x_hat [M, K]

`tensor_amax(x, signs?)`: the first pass (exact max |RHT?(x)|, fp32 0-dim, on device). Launch shapes: `CONFIG`.
`quantize` / `dequantize` below are the user-facing wrappers: any leading dims, input validation, the
same `NVFP4Quantized` result as reference.quantize, and bit-identical codes and scales. On a machine
without CUDA the kernels only run under TRITON_INTERPRET=1 (set before this module is imported).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from ...constants import BLOCK
from ..reference import NVFP4Quantized
from .dequantize_triton import dequantize_kernel
from .quantize_triton import (SR_BITS, SR_NONE, SR_PHILOX, amax_kernel, philox_bits_kernel,
                              quantize_16x16_kernel, quantize_1x16_kernel)

CONFIG = {
    "amax": dict(NB=1024, num_warps=8),        # 16-blocks per program (8 words each): 32 KiB of bf16
    "1x16": dict(NB=256, num_warps=4),         # 8 KiB of bf16 per program
    "16x16": dict(BR=32, BW=128, num_warps=4),  # rows x words (BW words = 2 * BW values)
    "dequant": dict(BW=4096, num_warps=4),     # code bytes per program (1x16, flat)
    "dequant2d": dict(BR=16, BW=256, num_warps=4),
}
"""Launch shapes (bench/bench_nvfp4.py --sweep compares alternatives); any value is correct, only speed varies."""


def _emulate_fma() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _words(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x [M, K] (contiguous) -> (words [M, K/2] holding value pairs, fp32?): bf16 as int32, fp32 as int64."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    x = x.contiguous()
    if x.storage_offset() % 2:
        x = x.clone()
    return x.view(torch.int32 if x.dtype == torch.bfloat16 else torch.int64), x.dtype == torch.float32


def tensor_amax(x: torch.Tensor, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max |RHT?(x)| of x [M, K] (K % 16 == 0) as an fp32 0-dim tensor, on device, without a host sync."""
    xw, x_fp32 = _words(x)
    bits = torch.zeros((), dtype=torch.int32, device=x.device)
    cfg = CONFIG["amax"]
    amax_kernel[(triton.cdiv(xw.numel(), 8 * cfg["NB"]),)](
        xw, signs if signs is not None else xw, bits, xw.numel(), X_FP32=x_fp32, USE_RHT=signs is not None,
        NB=cfg["NB"], num_warps=cfg["num_warps"])
    return bits.view(torch.float32)


@torch.library.custom_op("megatron_longlive::nvfp4_quantize", mutates_args=())
def nvfp4_quantize(x: torch.Tensor, signs: Optional[torch.Tensor], rand: Optional[torch.Tensor], seed: int,
                   sr_mode: int, block_2d: bool, amax: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(m // BLOCK if block_2d else m, k // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
    ts = torch.empty((), dtype=torch.float32, device=x.device)
    if amax is None:            # first pass: amax of the (transformed) tensor, reduced without a host sync
        amax = tensor_amax(x, signs)
    amax = amax.to(torch.float32).reshape(()).contiguous()
    xw, x_fp32 = _words(x)
    emulate = _emulate_fma()
    if block_2d:
        cfg = CONFIG["16x16"]
        grid = (triton.cdiv(m, cfg["BR"]), triton.cdiv(k // 2, cfg["BW"]))
        quantize_16x16_kernel[grid](xw, amax, packed, scales.view(torch.uint8), ts, m, k // 2, X_FP32=x_fp32,
                                    EMULATE_FMA=emulate, BR=cfg["BR"], BW=cfg["BW"], num_warps=cfg["num_warps"])
    else:
        cfg = CONFIG["1x16"]
        nw = xw.numel()
        randw = xw
        if sr_mode == SR_BITS:   # int32 bits of a value pair in one int64 word, like the values
            randw = (rand if rand.storage_offset() % 2 == 0 else rand.clone()).view(torch.int64)
        quantize_1x16_kernel[(triton.cdiv(nw, 8 * cfg["NB"]),)](
            xw, signs if signs is not None else xw, randw, amax, packed, scales.view(torch.uint8), ts, seed, nw,
            X_FP32=x_fp32, USE_RHT=signs is not None, SR=sr_mode, EMULATE_FMA=emulate, NB=cfg["NB"],
            num_warps=cfg["num_warps"])
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
    m, kw = packed.shape
    bf16 = dtype == torch.bfloat16
    out = torch.empty(m, 2 * kw, dtype=torch.bfloat16 if bf16 else torch.float32, device=packed.device)
    outw = out.view(torch.int32 if bf16 else torch.int64)
    if block_2d:
        cfg = CONFIG["dequant2d"]
        grid, rows, words, br = (triton.cdiv(kw, cfg["BW"]), triton.cdiv(m, cfg["BR"])), m, kw, cfg["BR"]
    else:                       # flat: one "row" of m * kw code bytes, one scale per 8 bytes
        cfg = CONFIG["dequant"]
        grid, rows, words, br = (triton.cdiv(m * kw, cfg["BW"]), 1), 1, m * kw, 1
    dequantize_kernel[grid](packed, scales.view(torch.uint8), ts.to(torch.float32), outw, rows, words,
                            ROWS_PER_SCALE=BLOCK if block_2d else 1, OUT_BF16=bf16, BR=br, BW=cfg["BW"],
                            num_warps=cfg["num_warps"])
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
    """int32 [.., K] bits in [0, 2**24): exactly those quantize(stochastic=True, seed=seed) draws (K % 16 == 0)."""
    n = 1
    for d in shape:
        n *= d
    out = torch.empty(n, dtype=torch.int32, device=device)
    philox_bits_kernel[(triton.cdiv(n // 4, 1024),)](out, seed, n // 4, BG=1024)
    return out.view(*shape)
