"""Per-rank teacher-forcing loss under a (balanced or naive) SP layout, built from the model's pieces.

Each rank builds only its local tokens (`balanced_sp.local_frame_info`): clean frames at t = 0 and
noisy frames z = (1 - σ) x + σ ε at t = 1000 σ, with σ per chunk, RoPE positions of the *video* frame
(so x_i and z_i share temporal positions), runs `model.forward_tokens` with the teacher-forcing mask in
the gathered order (the Ulysses cores do the exchange), and returns

    loss_r = Σ_{local noisy elements} (v̂ - (ε - x))² / (B · F · tokens_per_frame · p · C),

so Σ_r loss_r is exactly the SP=1 loss (mean squared error over all noisy elements) and gradients
summed over the SP group are the SP=1 gradients. Noise is drawn per video frame from a seed
(`frame_noise`), so every layout sees the same ε without communication.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..models.wan.rope import grid_positions
from ..training.schedule import noise_latents, sigma_to_timestep, velocity_target
from .balanced_sp import TFLayout, local_frame_info, sp_mask


@dataclasses.dataclass
class LocalTFInputs:
    """What one rank feeds `model.forward_tokens` (and the target of its loss)."""

    tokens: torch.Tensor      # [B, S_local, D]
    t: torch.Tensor           # [B, F_local]
    positions: torch.Tensor   # [S_local, 3]
    target: torch.Tensor      # [B, S_local, p*C] velocity target (zeros on clean frames)
    weight: torch.Tensor      # [F_local] 1.0 on noisy (loss-bearing) frames, 0.0 on clean ones


def needed_frames(layout: TFLayout, rank: int) -> range:
    """The contiguous range of video latent frames whose latents rank `rank` needs."""
    frames, _ = local_frame_info(layout, rank)
    return range(int(frames.min()), int(frames.max()) + 1)


def frame_noise(seed: int, batch: int, channels: int, frames: range, height: int, width: int,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """[B, C, len(frames), H, W] standard normal noise, each video frame from its own seeded generator."""
    out = []
    for f in frames:
        g = torch.Generator().manual_seed(seed * 1_000_003 + f)
        out.append(torch.randn(batch, channels, 1, height, width, generator=g))
    return torch.cat(out, dim=2).to(device=device, dtype=dtype)


def patchify_target(v: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F'*H'*W', pt*ph*pw*C] in the head's channel order (inverse of `unpatchify`)."""
    b, c, f, h, w = v.shape
    pt, ph, pw = patch
    x = v.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = torch.einsum("bcfphqwr->bfhwpqrc", x)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def build_local_inputs(model, layout: TFLayout, rank: int, latents: torch.Tensor, noise: torch.Tensor,
                       sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> LocalTFInputs:
    """Assemble rank `rank`'s local sequence.

    latents, noise: [B, C, len(needed_frames), H, W] (the rank's frames only); sigmas: [B, num_chunks].
    """
    if model.cfg.patch_size[0] != 1:
        raise ValueError(f"model.patch_size={model.cfg.patch_size}: SP teacher forcing needs a temporal patch of 1")
    frames, noisy = local_frame_info(layout, rank)
    lo = needed_frames(layout, rank).start
    if latents.shape[2] != len(needed_frames(layout, rank)) or noise.shape != latents.shape:
        raise ValueError(f"rank {rank}: expected latents/noise for frames {needed_frames(layout, rank)}, got "
                         f"latents {tuple(latents.shape)}, noise {tuple(noise.shape)}")
    chunk = frames // layout.chunk_frames                               # [F_local]
    sigma_frames = sigmas[:, chunk[noisy]]                              # [B, F_noisy]
    sel_noisy = (frames[noisy] - lo).to(latents.device)
    x_noisy = latents.index_select(2, sel_noisy)
    eps = noise.index_select(2, sel_noisy)
    z = noise_latents(x_noisy, eps, sigma_frames[:, None, :, None, None].to(latents.dtype))
    x_clean = latents.index_select(2, (frames[~noisy] - lo).to(latents.device))
    # 1. tokens of the clean and the noisy frames (patchify is per frame for pt = 1)
    clean_tok = model.patchify(x_clean)[0] if x_clean.shape[2] else None
    noisy_tok = model.patchify(z)[0] if z.shape[2] else None
    # 2. interleave into the local frame order, with timesteps, positions and targets
    return _assemble(model, layout, frames, noisy, clean_tok, noisy_tok, velocity_target(x_noisy, eps),
                     sigma_frames, num_train_timesteps, latents.shape[-2:])


def _assemble(model, layout, frames, noisy, clean_tok, noisy_tok, target_noisy, sigma_frames, num_train_timesteps,
              latent_hw) -> LocalTFInputs:
    tpf = layout.tokens_per_frame
    _, ph, pw = model.cfg.patch_size
    gh, gw = latent_hw[0] // ph, latent_hw[1] // pw
    parts = [p for p in (clean_tok, noisy_tok) if p is not None]
    b, d = parts[0].shape[0], parts[0].shape[-1]
    ref = parts[0]
    tokens = ref.new_zeros(b, frames.numel(), tpf, d)
    if clean_tok is not None:
        tokens[:, ~noisy] = clean_tok.view(b, -1, tpf, d)
    if noisy_tok is not None:
        tokens[:, noisy] = noisy_tok.view(b, -1, tpf, d)
    out_dim = math.prod(model.cfg.patch_size) * model.cfg.out_channels
    target = ref.new_zeros(b, frames.numel(), tpf, out_dim)
    if noisy.any():
        target[:, noisy] = patchify_target(target_noisy, model.cfg.patch_size).view(b, -1, tpf, out_dim).to(ref.dtype)
    t = ref.new_zeros(b, frames.numel(), dtype=torch.float32)
    t[:, noisy] = sigma_to_timestep(sigma_frames.to(t), num_train_timesteps)
    hw = grid_positions(1, gh, gw, device=ref.device)                  # [tpf, 3] at frame 0
    positions = hw[None].repeat(frames.numel(), 1, 1)
    positions[..., 0] = frames.to(ref.device)[:, None]
    return LocalTFInputs(tokens.view(b, -1, d), t, positions.view(-1, 3), target.view(b, -1, out_dim),
                         noisy.to(device=ref.device, dtype=torch.float32))


def local_tf_loss(model, layout: TFLayout, rank: int, latents: torch.Tensor, noise: torch.Tensor,
                  sigmas: torch.Tensor, context: torch.Tensor, num_train_timesteps: int = 1000,
                  mask=None) -> torch.Tensor:
    """This rank's share of the teacher-forcing loss (shares sum to the SP=1 loss)."""
    inp = build_local_inputs(model, layout, rank, latents, noise, sigmas, num_train_timesteps)
    mask = sp_mask(layout, inp.tokens.device) if mask is None else mask
    pred = model.forward_tokens(inp.tokens, inp.t, model.embed_context(context), inp.positions, mask)
    b, _, out_dim = pred.shape
    err = (pred.float() - inp.target.float()).pow(2).view(b, inp.weight.numel(), -1, out_dim)
    total = b * layout.num_frames * layout.tokens_per_frame * out_dim
    return err[:, inp.weight.bool()].sum() / total
