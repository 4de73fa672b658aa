"""Wan video VAE wrapper around diffusers' `AutoencoderKLWan` (Wan2.1: 16 ch, 4x8x8; Wan2.2: 48 ch, 4x16x16).

The wrapper fixes the conventions the rest of the package relies on:

* `encode(video)` takes pixels in [-1, 1] shaped [B, 3, T, H, W] with T = 1 + 4k and returns *normalized*
  latents [B, C, 1 + k, H/s, W/s]: the posterior mean (deterministic), then `(mu - mean) * (1 / std)` with the
  per-channel `latents_mean` / `latents_std` of the VAE config, exactly as Wan and diffusers' Wan pipelines do.
* `decode(latents)` undoes the normalization and returns pixels in [-1, 1].

The causal Wan VAE groups frames as [first frame alone] + groups of 4, so pixel and latent frame counts follow
the 1 + 4k rule: `latent_frames_for` / `pixel_frames_for` convert between them and reject other counts.
Nothing here downloads: `tiny()` builds random small configs (or, with `pretrained=True` for wan2.1, loads the
shipped tiny weights trained on the synthetic shapes by tools/train_tiny_vae.py), `random()` the real
architectures with random weights, `from_pretrained()` reads a local diffusers directory, an official Wan2.1
`.pth` file, or `builtin:tiny-wan2.1` (the shipped tiny weights).
"""
from __future__ import annotations

import copy
import os
from typing import Literal

import torch
from diffusers import AutoencoderKLWan
from torch import nn

VaeKind = Literal["wan2.1", "wan2.2"]
TEMPORAL_STRIDE = 4
# The shipped tiny Wan2.1 VAE (package data), reachable as a path value `builtin:tiny-wan2.1`.
BUILTIN_TINY_WAN21 = "builtin:tiny-wan2.1"
TINY_WAN21_ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "assets", "tiny_vae_wan21")

# Per-channel latent statistics of the official checkpoints (diffusers' Wan2.1 default and the
# Wan2.2-TI2V-5B-Diffusers vae/config.json, as written by diffusers' scripts/convert_wan_to_diffusers.py).
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                      -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                      -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                      -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                      -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                      0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                     0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                     0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                     0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                     0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]

# Official architectures (diffusers config keys).
VAE_CONFIGS: dict[str, dict] = {
    "wan2.1": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], latents_mean=WAN21_LATENTS_MEAN,
                   latents_std=WAN21_LATENTS_STD, is_residual=False, in_channels=3, out_channels=3,
                   patch_size=None, scale_factor_temporal=4, scale_factor_spatial=8),
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   attn_scales=[], temperal_downsample=[False, True, True], latents_mean=WAN22_LATENTS_MEAN,
                   latents_std=WAN22_LATENTS_STD, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16),
}

# Small random configs for tests and the CPU demo: same block structure and compression as the real ones
# (so temporal grouping, causal caches and strides behave identically), narrow channels, one res block.
TINY_OVERRIDES: dict[str, dict] = {
    "wan2.1": dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "wan2.2": dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
}


def latent_frames_for(pixel_frames: int, temporal_stride: int = TEMPORAL_STRIDE) -> int:
    """Latent frames the causal Wan VAE makes from `pixel_frames` = 1 + stride * k pixel frames (-> 1 + k)."""
    if pixel_frames < 1 or (pixel_frames - 1) % temporal_stride:
        lo = max(1, 1 + (pixel_frames - 1) // temporal_stride * temporal_stride)
        raise ValueError(f"pixel frame count {pixel_frames} is not 1 + {temporal_stride}k (the causal Wan VAE "
                         f"encodes the first frame alone, then groups of {temporal_stride}). Fix: use "
                         f"{lo} or {lo + temporal_stride} frames.")
    return 1 + (pixel_frames - 1) // temporal_stride


def pixel_frames_for(latent_frames: int, temporal_stride: int = TEMPORAL_STRIDE) -> int:
    """Pixel frames that `latent_frames` latent frames decode to: 1 + stride * (latent_frames - 1)."""
    if latent_frames < 1:
        raise ValueError(f"latent frame count must be >= 1, got {latent_frames}. Fix: pass a positive count.")
    return 1 + temporal_stride * (latent_frames - 1)


class WanVAE(nn.Module):
    """Normalized-latent interface to a diffusers `AutoencoderKLWan` (see module docstring)."""

    def __init__(self, model: AutoencoderKLWan, kind: VaeKind):
        super().__init__()
        if kind not in VAE_CONFIGS:
            raise ValueError(f"vae kind {kind!r} unknown. Fix: use one of {', '.join(VAE_CONFIGS)}.")
        self.model = model.eval()
        self.kind = kind
        z = model.config.z_dim
        for name in ("latents_mean", "latents_std"):
            if len(model.config[name]) != z:
                raise ValueError(f"VAE config {name} has {len(model.config[name])} entries but z_dim={z}. "
                                 f"Fix: give one value per latent channel.")

    # ---- construction -------------------------------------------------------------------------------------
    @staticmethod
    def config_for(kind: VaeKind, tiny: bool = False) -> dict:
        """The diffusers config dict of the official architecture `kind` (or its tiny variant)."""
        if kind not in VAE_CONFIGS:
            raise ValueError(f"vae kind {kind!r} unknown. Fix: use one of {', '.join(VAE_CONFIGS)}.")
        cfg = copy.deepcopy(VAE_CONFIGS[kind])
        if tiny:
            cfg.update(copy.deepcopy(TINY_OVERRIDES[kind]))
        return cfg

    @classmethod
    def tiny(cls, kind: VaeKind = "wan2.1", seed: int = 0, pretrained: bool = False) -> "WanVAE":
        """Small VAE with the real compression (wan2.1: 16 ch 4x8x8; wan2.2: 48 ch 4x16x16): random (seeded), or
        with `pretrained=True` the shipped wan2.1 weights trained on the synthetic shapes (seed is then unused)."""
        if not pretrained:
            return cls.random(kind, seed=seed, tiny=True)
        if kind != "wan2.1":
            raise ValueError(f"no shipped tiny weights for vae kind {kind!r}. Fix: use kind='wan2.1' or "
                             f"pretrained=False")
        if not os.path.isfile(os.path.join(TINY_WAN21_ASSET, "config.json")):
            raise FileNotFoundError(f"shipped tiny VAE missing at {TINY_WAN21_ASSET}. Fix: reinstall the package or "
                                    f"run `python tools/train_tiny_vae.py`")
        model = AutoencoderKLWan.from_pretrained(TINY_WAN21_ASSET, local_files_only=True)
        expected = cls.config_for("wan2.1", tiny=True)
        got = {k: model.config[k] for k in expected if k not in ("latents_mean", "latents_std")}
        if got != {k: v for k, v in expected.items() if k in got}:
            raise ValueError(f"{TINY_WAN21_ASSET}: config {got} differs from the tiny wan2.1 architecture. Fix: "
                             f"retrain it with tools/train_tiny_vae.py")
        return cls(model.float(), "wan2.1")

    @classmethod
    def random(cls, kind: VaeKind = "wan2.1", seed: int = 0, tiny: bool = False) -> "WanVAE":
        """Randomly initialised VAE with the official architecture of `kind` (or the tiny variant)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKLWan(**cls.config_for(kind, tiny=tiny))
        return cls(model, kind)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load real weights from a local diffusers VAE directory (config.json + weights; a pipeline root with a
        `vae/` subfolder also works), an official Wan2.1 `.pth`/`.safetensors` file, or `builtin:tiny-wan2.1`
        (the shipped tiny VAE, see `tiny`). Never downloads."""
        if path == BUILTIN_TINY_WAN21:
            return cls.tiny("wan2.1", pretrained=True).to(dtype)
        if path.startswith("builtin:"):
            raise ValueError(f"unknown builtin VAE {path!r}. Fix: use {BUILTIN_TINY_WAN21!r} or a local path")
        if not os.path.exists(path):
            raise FileNotFoundError(f"VAE weights not found at {path!r}. Fix: pass a local diffusers VAE directory "
                                    f"(e.g. Wan2.1-T2V-1.3B-Diffusers/vae) or the official Wan2.1_VAE.pth file.")
        if os.path.isdir(path):
            sub = ""
            if not os.path.isfile(os.path.join(path, "config.json")):
                if os.path.isfile(os.path.join(path, "vae", "config.json")):
                    sub = "vae"
                else:
                    raise FileNotFoundError(f"{path!r} has no config.json (nor vae/config.json). Fix: point to the "
                                            f"diffusers-format VAE directory.")
            model = AutoencoderKLWan.from_pretrained(path, subfolder=sub or None, torch_dtype=dtype,
                                                     local_files_only=True)
        else:
            model = _load_official_file(path).to(dtype)
        kind: VaeKind = "wan2.2" if model.config.is_residual else "wan2.1"
        return cls(model, kind)

    # ---- properties -----------------------------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def spatial_stride(self) -> int:
        return self.model.config.scale_factor_spatial

    @property
    def temporal_stride(self) -> int:
        return self.model.config.scale_factor_temporal

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def latent_frames_for(self, pixel_frames: int) -> int:
        return latent_frames_for(pixel_frames, self.temporal_stride)

    def pixel_frames_for(self, latent_frames: int) -> int:
        return pixel_frames_for(latent_frames, self.temporal_stride)

    # ---- normalization ----------------------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.model.config.latents_mean, device=like.device).view(shape)
        std = torch.tensor(self.model.config.latents_std, device=like.device).view(shape)
        return mean.to(like.dtype), std.to(like.dtype)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean -> the DiT's latent space: (mu - mean) * (1 / std), as Wan does."""
        mean, std = self._stats(mu)
        return (mu - mean) * (1.0 / std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: z * std + mean."""
        mean, std = self._stats(z)
        return z * std + mean

    # ---- encode / decode --------------------------------------------------------------------------------------
    def check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}.")
        self.latent_frames_for(video.shape[2])
        h, w = video.shape[-2:]
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"video height/width {h}x{w} must be multiples of the VAE's spatial stride "
                             f"{self.spatial_stride}. Fix: resize or crop the video.")

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior mean (not normalized) of `video` [B, 3, T, H, W] -> [B, C, 1 + (T-1)/4, H/s, W/s]."""
        self.check_video(video)
        posterior = self.model.encode(video.to(self.dtype)).latent_dist
        return posterior.mode()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, T, H, W] in [-1, 1] -> normalized latents [B, C, 1 + (T-1)/4, H/s, W/s]."""
        return self.normalize(self.encode_raw(video))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, F, h, w] -> pixels [B, 3, 1 + 4(F-1), h*s, w*s] in [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, F, h, w], got shape {tuple(latents.shape)}.")
        return self.model.decode(self.denormalize(latents.to(self.dtype))).sample


def _load_official_file(path: str) -> AutoencoderKLWan:
    """An official Wan VAE checkpoint (`Wan2.1_VAE.pth`) converted with diffusers' single-file key mapping."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    conv1 = sd.get("encoder.conv1.weight")
    if conv1 is None:
        raise ValueError(f"{path!r} is not an official Wan VAE checkpoint (no 'encoder.conv1.weight'; first keys: "
                         f"{sorted(sd)[:5]}). Fix: pass Wan2.1_VAE.pth or a diffusers VAE directory.")
    if conv1.shape[1] != 3:
        raise ValueError(f"{path!r} looks like the Wan2.2 VAE (encoder input has {conv1.shape[1]} channels); "
                         f"diffusers has no single-file mapping for it. Fix: convert it with diffusers' "
                         f"scripts/convert_wan_to_diffusers.py (or use Wan2.2-TI2V-5B-Diffusers/vae) and pass "
                         f"that directory.")
    converted = convert_wan_vae_to_diffusers(sd)
    model = AutoencoderKLWan(**WanVAE.config_for("wan2.1"))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path!r}: checkpoint keys do not match the Wan2.1 VAE. missing={missing[:20]} "
                         f"unexpected={unexpected[:20]}. Fix: pass the official Wan2.1_VAE.pth.")
    return model
