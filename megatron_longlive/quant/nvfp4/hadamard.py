"""Random Hadamard transform (RHT) over 16-value blocks, as in the NVFP4 training recipe.

RHT(x_b) = (x_b * s) @ H16 / 4 for every block x_b of 16 consecutive values of the last dim, where
H16 is the natural-order (Sylvester) Hadamard matrix, H[i, j] = (-1)^popcount(i & j), and s a vector
of 16 random signs. M = diag(s) H16 / 4 is orthogonal, so for the weight-gradient GEMM
dW = dy^T x = (dy^T M)(x^T M)^T the transform cancels exactly while spreading block outliers.

The signs come from a private `torch.Generator` seeded with `seed`: no global RNG state is read or
advanced, so every tensor-parallel rank given the same seed builds the same matrix.

The product by H16 is computed as a fast Walsh-Hadamard butterfly in a fixed order (bit 3, 2, 1, 0
of the index: pairs at distance 8, then 4, 2, 1), each stage one fp32 add and one fp32 sub per pair;
the Triton kernel performs the same operations in the same order and so matches bit for bit.
"""
from __future__ import annotations

import torch

from ..constants import BLOCK


def rht_signs(seed: int, device=None) -> torch.Tensor:
    """[16] float32 of +-1, a pure function of `seed`."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (BLOCK,), generator=gen)
    return (1.0 - 2.0 * bits.to(torch.float32)).to(device)


def hadamard_matrix(n: int = BLOCK, dtype=torch.float64) -> torch.Tensor:
    """Unnormalized natural-order Hadamard matrix [n, n] (n a power of two)."""
    idx = torch.arange(n)
    popcount = torch.zeros(n, n, dtype=torch.int64)
    anded = idx[:, None] & idx[None, :]
    for bit in range(max(1, n.bit_length())):
        popcount += (anded >> bit) & 1
    return (1 - 2 * (popcount % 2)).to(dtype)


def rht_matrix(seed: int, dtype=torch.float64) -> torch.Tensor:
    """M = diag(signs) @ H16 / 4, so that RHT(x_b) = x_b @ M (orthogonal: M M^T = I)."""
    return torch.diag(rht_signs(seed).to(dtype)) @ hadamard_matrix(BLOCK, dtype) / 4


def fwht16(x: torch.Tensor) -> torch.Tensor:
    """x_b @ H16 for every 16-block of the last dim by the butterfly described above (no scaling)."""
    shape = x.shape
    for groups in (1, 2, 4, 8):                      # pair distance 8, 4, 2, 1
        width = BLOCK // (2 * groups)
        v = x.reshape(*shape[:-1], -1, groups, 2, width)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(shape)
    return x


def rht(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Random Hadamard transform of every 16-block of the last dim of `x` (fp32 in, fp32 out)."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"RHT: last dim {x.shape[-1]} must be a multiple of {BLOCK}")
    return fwht16(x * signs.to(x.device, x.dtype).repeat(x.shape[-1] // BLOCK)) * 0.25


def inverse_rht(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse transform: x_b @ M^T = (x_b @ H16 / 4) * s."""
    return fwht16(x) * 0.25 * signs.to(x.device, x.dtype).repeat(x.shape[-1] // BLOCK)
