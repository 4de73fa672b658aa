"""Chunked causal-VAE encoding with a left halo: encode pixel frames [start, end) exactly as a full encode would.

Why it is exact. The Wan encoder is a stack of causal temporal convolutions (kernel 3, zero padding on the
left), strided causal time convolutions, and per-frame / per-position ops (RMS norm over channels, spatial
attention). diffusers runs it chunk by chunk with `feat_cache`, but that cache only holds the last 2 frames of
each causal conv's input, i.e. it is the same computation as one causal convolution over the whole video.
So every latent depends on a *finite* window of past pixel frames: its temporal receptive field. Encoding a
window that starts at least one receptive field before `start` gives the full-video latents of [start, end).

Frame grouping. The causal Wan VAE encodes the first frame of any clip alone, then groups of 4:
latent 0 <- frame 0, latent j >= 1 <- frames 4j-3 .. 4j. Chunk boundaries therefore sit on latent boundaries
(`start` = 0 or 1 + 4m, `end` = 1 + 4n), and a window that does not begin at frame 0 begins one frame before a
group (at a frame = 0 mod 4): that "priming" frame is encoded alone like a clip's first frame, so the window's
groups of 4 line up with the full video's. Its latent and the `halo / 4` halo latents are dropped.

`halo` is counted in pixel frames of real context before `start` (a multiple of 4; `halo / 4` latents; the one
priming frame comes on top). LongLive-2.0's `vae_halo_latents: 28` is halo = 112 here. The minimum halo per
architecture was measured by `bench/measure_vae_receptive_field.py` (see docs/vae_halo.md) and is the default.
"""
from __future__ import annotations

import dataclasses

import torch

from .vae import WanVAE, latent_frames_for

# Smallest halo (pixel frames) at which halo encoding equals the full encode in float32 (max abs diff <= 1e-5)
# and in float64 (<= 1e-12: the exact causal support), measured with random weights for each encoder
# architecture; keyed by `architecture_key`. Command and tables: docs/vae_halo.md.
MIN_HALO_FRAMES: dict[str, int] = {
    "plain-res1-stages4-tdFTT-attn0": 76,  # WanVAE.tiny("wan2.1")
    "residual-res1-stages4-tdFTT-attn0": 76,  # WanVAE.tiny("wan2.2")
    "plain-res2-stages4-tdFTT-attn0": 108,  # the Wan2.1 VAE (27 latents)
    "residual-res2-stages4-tdFTT-attn0": 108,  # the Wan2.2 VAE (27 latents)
}


def architecture_key(vae: WanVAE) -> str:
    """What the encoder's temporal receptive field depends on (not widths, not weights, not spatial size)."""
    c = vae.model.config
    td = "".join("T" if t else "F" for t in c.temperal_downsample)
    return (f"{'residual' if c.is_residual else 'plain'}-res{c.num_res_blocks}-stages{len(c.dim_mult)}-td{td}"
            f"-attn{len(c.attn_scales)}")


def min_halo_frames(vae: WanVAE) -> int:
    """The measured minimum halo (pixel frames) for `vae`'s encoder architecture."""
    key = architecture_key(vae)
    if key not in MIN_HALO_FRAMES:
        raise ValueError(f"no measured temporal receptive field for VAE encoder architecture {key!r} (known: "
                         f"{', '.join(MIN_HALO_FRAMES)}). Fix: run `python bench/measure_vae_receptive_field.py` "
                         f"for this config and add it to MIN_HALO_FRAMES, or pass an explicit halo.")
    return MIN_HALO_FRAMES[key]


@dataclasses.dataclass(frozen=True)
class HaloWindow:
    """Which pixel frames to encode for the latents of pixel frames [start, end), and which latents to keep."""

    raw_start: int
    """First pixel frame to encode (0, or a frame = 0 mod 4 that primes the causal grouping)."""
    raw_end: int
    """One past the last pixel frame to encode (= end)."""
    drop: int
    """Leading latents of the window's encode to drop (halo latents, plus the priming latent if any)."""
    keep: int
    """Latents to keep after the dropped ones: the latents of frames [start, end)."""
    latent_start: int
    """Index of the first kept latent in the full video's latents."""


def halo_window(start: int, end: int, halo: int, temporal_stride: int = 4) -> HaloWindow:
    """The encode window for pixel frames [start, end) with `halo` pixel frames of left context (pure function)."""
    s = temporal_stride
    if start < 0 or (start != 0 and (start - 1) % s):
        raise ValueError(f"start={start} is not on a latent boundary. Fix: use 0 or 1 + {s}m (the causal VAE "
                         f"encodes frame 0 alone, then groups of {s}).")
    if end <= start or (end - 1) % s:
        raise ValueError(f"end={end} must be > start={start} and of the form 1 + {s}n (a latent boundary).")
    if halo < 0 or halo % s:
        raise ValueError(f"halo={halo} must be a non-negative multiple of {s} pixel frames (or -1 for auto).")
    latent_start = 0 if start == 0 else latent_frames_for(start, s)  # latents before frame `start`
    keep = latent_frames_for(end, s) - latent_start
    if start - halo <= 1:  # the halo reaches the video's start: encode from frame 0, no priming frame
        return HaloWindow(0, end, latent_start, keep, latent_start)
    return HaloWindow(start - halo - 1, end, 1 + halo // s, keep, latent_start)


@torch.no_grad()
def encode_frames_with_halo(vae: WanVAE, video: torch.Tensor, start: int, end: int, halo: int = -1) -> torch.Tensor:
    """Normalized latents of pixel frames [start, end) of `video` [B, 3, T, H, W], equal to
    `vae.encode(video)[:, :, latent_start : latent_start + keep]`, while encoding only frames
    [start - halo - 1, end). `halo=-1` uses the measured minimum for this encoder architecture; a shorter halo
    is rejected (it would silently change the latents)."""
    if video.dim() != 5:
        raise ValueError(f"video must be [B, 3, T, H, W], got shape {tuple(video.shape)}.")
    if end > video.shape[2]:
        raise ValueError(f"end={end} is past the video's {video.shape[2]} frames.")
    if halo == -1:
        halo = min_halo_frames(vae)
    elif start - halo > 1:  # a halo matters only when it does not reach back to frame 0
        needed = min_halo_frames(vae)
        if halo < needed:
            raise ValueError(f"halo={halo} pixel frames is shorter than the VAE encoder's measured temporal "
                             f"receptive field ({architecture_key(vae)}): minimum halo is {needed} frames "
                             f"({needed // vae.temporal_stride} latents). Fix: pass halo >= {needed} or -1 (auto).")
    w = halo_window(start, end, halo, vae.temporal_stride)
    latents = vae.encode(video[:, :, w.raw_start:w.raw_end])  # [B, C, drop + keep, h, w]
    assert latents.shape[2] == w.drop + w.keep, (latents.shape, w)
    return latents[:, :, w.drop:]


@torch.no_grad()
def halo_error_curve(vae: WanVAE, video: torch.Tensor, start: int, end: int, halos: list[int],
                     full: torch.Tensor | None = None, progress: bool = False) -> list[tuple[int, float]]:
    """Max |halo encode - full encode| over the latents of [start, end) for each halo (measurement helper;
    no minimum enforced)."""
    from tqdm import tqdm

    full = vae.encode(video) if full is None else full
    out = []
    for h in tqdm(halos, desc=f"{vae.kind} halo sweep", leave=False, disable=not progress):
        w = halo_window(start, end, h, vae.temporal_stride)
        part = vae.encode(video[:, :, w.raw_start:w.raw_end])[:, :, w.drop:]
        ref = full[:, :, w.latent_start:w.latent_start + w.keep]
        out.append((h, (part.double() - ref.double()).abs().max().item()))
    return out
