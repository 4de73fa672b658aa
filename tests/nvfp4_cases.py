"""Adversarial NVFP4 inputs shared by the interpreter and GPU kernel tests: values on and next to every
E2M1 rounding boundary of their block, for block scales across the whole E4M3 range (subnormal ones too).

The kernels divide by the block scale with one reciprocal per block and a Markstein correction per value
(quantize_triton.py); these inputs make any quotient that is not correctly rounded change a code.
"""
from __future__ import annotations

import torch

from megatron_longlive.quant.constants import TENSOR_SCALE_DENOM
from megatron_longlive.quant.nvfp4 import reference as R

BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0)
"""Midpoints between E2M1 neighbours (ties go to the even code) and the saturation point."""


def near_boundary_data(rows: int, k: int, seed: int = 0, amax: float = 2688.0, block_2d: bool = False
                       ) -> torch.Tensor:
    """fp32 [rows, k] (k % 16 == 0; rows too for block_2d). Per block (16 values, or a 16x16 tile): one
    value is the block max (log-uniform over ~2**-20..1 of `amax`, so block scales cover normal and
    subnormal E4M3; block 0 holds `amax` itself), the others are fp32(t * scale) moved by -3..3 ulp for
    boundaries t, with random signs."""
    g = torch.Generator().manual_seed(seed)
    n = 256 if block_2d else 16
    nb = rows * k // n
    bmax = amax * torch.exp2(-20 * torch.rand(nb, generator=g))
    bmax[0] = amax
    s_t = torch.tensor(amax, dtype=torch.float32) / TENSOR_SCALE_DENOM
    scale = R.block_scales(bmax, s_t).float() * s_t                       # [nb] effective decode scale
    t = torch.tensor(BOUNDARIES)[torch.randint(0, len(BOUNDARIES), (nb, n - 1), generator=g)]
    v = (t * scale[:, None]).float()
    steps = torch.randint(-3, 4, (nb, n - 1), generator=g)
    for _ in range(3):                                                     # move |steps| ulp up or down
        v = torch.where(steps > 0, torch.nextafter(v, torch.full_like(v, float("inf"))), v)
        v = torch.where(steps < 0, torch.nextafter(v, torch.zeros_like(v)), v)
        steps = steps - steps.sign()
    v = torch.minimum(v, bmax[:, None])                                    # the block max stays the max
    sign = torch.where(torch.rand(nb, n - 1, generator=g) < 0.5, -1.0, 1.0)
    blocks = torch.cat([bmax[:, None], v * sign], dim=1)                  # [nb, n]
    blocks = torch.gather(blocks, 1, torch.argsort(torch.rand(nb, n, generator=g), dim=1))
    if block_2d:                                                           # [M/16, K/16, 16, 16] tiles
        return blocks.view(rows // 16, k // 16, 16, 16).permute(0, 2, 1, 3).reshape(rows, k).contiguous()
    return blocks.reshape(rows, k).contiguous()
