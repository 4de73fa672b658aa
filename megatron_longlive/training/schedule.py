"""Wan's shifted flow-matching schedule: sigma in [0, 1], timestep = sigma * 1000.

Flow matching interpolates z = (1 - sigma) x + sigma eps and predicts the velocity eps - x. Wan
shifts a uniform sigma grid towards high noise with sigma' = shift * s / (1 + (shift - 1) * s)
(shift 5.0 for Wan2.1/2.2 and LongLive); inference timestep lists use the same map.
"""
from __future__ import annotations

import torch


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: s in [0, 1] -> shift*s / (1 + (shift-1)*s). shift=1 is the identity."""
    return shift * s / (1 + (shift - 1) * s)


def sigma_to_timestep(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Continuous model timestep (what the time embedding sees): sigma * num_train_timesteps."""
    return sigma * num_train_timesteps


def sample_sigmas(shape: tuple[int, ...], shift: float = 5.0, num_train_timesteps: int = 1000,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Independent training sigmas of the given shape (e.g. [B, num_chunks]).

    A uniform draw over the discrete grid s = k / N, k = 1..N (N = num_train_timesteps), then shifted:
    every sigma is in (0, 1], never exactly clean. Drawn on the CPU generator for reproducibility.
    """
    k = torch.randint(1, num_train_timesteps + 1, shape, generator=generator)
    s = k.to(torch.float64) / num_train_timesteps
    return shift_sigma(s, shift).to(device=device, dtype=dtype)


def noise_latents(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z = (1 - sigma) x + sigma eps. x, noise: [B, C, F, H, W]; sigma broadcastable, e.g. [B, 1, F, 1, 1]."""
    return (1 - sigma) * x + sigma * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity dz/dsigma = eps - x."""
    return noise - x
