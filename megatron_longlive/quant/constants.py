"""Numeric constants of the NVFP4 and FP8 formats (one source of truth for reference, kernels, tests).

NVFP4 = E2M1 elements (4 bits: sign, 2 exponent bits, 1 mantissa bit, no Inf/NaN), one E4M3 scale per
block of 16 consecutive values, and one FP32 scale per tensor. A code's bits are `s e e m`; the 8
magnitudes, indexed by the low 3 bits, are `E2M1_VALUES`.
"""
from __future__ import annotations

BLOCK = 16
"""Values sharing one E4M3 block scale (1x16 for activations/gradients, 16x16 tiles for 2D weights)."""

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitude of E2M1 code c (c = 0..7); code c | 0b1000 is the negative (code 8 is -0.0)."""
E2M1_MAX = 6.0
E2M1_SIGN_BIT = 0x8

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn (0b0_1111_110); the format has no Inf, 0x7f/0xff are NaN."""
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_MIN_SUBNORMAL = 2.0 ** -9
E4M3_MANTISSA_BITS = 3
E4M3_EXP_BIAS = 7

TENSOR_SCALE_DENOM = E2M1_MAX * E4M3_MAX
"""Per-tensor decode scale = amax / (6 * 448) = amax / 2688: maps the tensor amax onto the largest
E2M1 value times the largest E4M3 block scale."""

SR_BITS = 24
"""Stochastic rounding draws u = r * 2**-24 with r an integer in [0, 2**24) (fp32-exact uniform)."""

RNE_MAGIC = 2.0 ** 23
"""(z + 2**23) - 2**23 rounds 0 <= z < 2**22 to the nearest integer, ties to even, in fp32 (kernels)."""

PACKING = "low nibble first"
"""Two E2M1 codes per byte: element 2i in bits 0-3, element 2i+1 in bits 4-7 (the order of
torch.float4_e2m1fn_x2 and of the cuBLAS/PTX e2m1x2 layout)."""

FP8_E4M3_MAX = 448.0
"""FP8 (Hopper path) uses the same E4M3 format, rowwise scales amax / 448."""
