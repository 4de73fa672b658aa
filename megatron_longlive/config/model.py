"""Model architecture config and the named presets (official Wan numbers)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .base import ConfigBase


@dataclasses.dataclass
class ModelConfig(ConfigBase):
    """Architecture of a Wan-family DiT. Defaults are the `tiny` preset (tests, CPU demo)."""

    _section: ClassVar[str] = "model"

    preset: str = "tiny"
    """Name of the preset these numbers came from (informational; `preset_config()` fills the rest)."""
    in_channels: int = 16
    """Latent channels from the VAE (Wan2.1 VAE: 16, Wan2.2 VAE: 48)."""
    out_channels: int = 16
    """Channels the head predicts (the flow-matching velocity; equals `in_channels`)."""
    dim: int = 64
    """Hidden size of every block."""
    ffn_dim: int = 128
    """Inner size of the feed-forward network."""
    num_heads: int = 2
    """Attention heads; must divide `dim`, and `dim / num_heads` must be even (RoPE pairs)."""
    num_layers: int = 2
    """Number of DiT blocks."""
    text_dim: int = 32
    """Width of the text encoder's token embeddings (umT5-XXL: 4096)."""
    text_len: int = 16
    """Text tokens per prompt after padding (Wan: 512)."""
    freq_dim: int = 32
    """Width of the sinusoidal timestep embedding (Wan: 256)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patchify kernel (time, height, width) in latent units."""
    qk_norm: bool = True
    """RMS-normalise queries and keys over all heads (Wan: on)."""
    cross_attn_norm: bool = True
    """LayerNorm with affine before cross-attention (Wan: on)."""
    eps: float = 1e-6
    """Epsilon of every norm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    vae: Literal["wan2.1", "wan2.2"] = "wan2.1"
    """Which VAE family produces the latents (channel count and compression follow)."""

    def validate(self) -> None:
        for name in ("in_channels", "out_channels", "dim", "ffn_dim", "num_heads", "num_layers",
                     "text_dim", "text_len", "freq_dim"):
            if getattr(self, name) <= 0:
                raise self.error(name, f"must be positive, got {getattr(self, name)}", f"set {self._section}.{name} > 0")
        if self.dim % self.num_heads:
            raise self.error("num_heads", f"num_heads={self.num_heads} must divide dim={self.dim}",
                             "choose num_heads among the divisors of dim")
        if self.head_dim % 2 or self.head_dim < 6:
            raise self.error("num_heads", f"head_dim={self.head_dim} must be even and >= 6 for 3D RoPE",
                             "pick num_heads so that dim/num_heads is an even number >= 6")
        if self.freq_dim % 2:
            raise self.error("freq_dim", f"freq_dim={self.freq_dim} must be even", "use an even freq_dim")
        if any(p <= 0 for p in self.patch_size):
            raise self.error("patch_size", f"entries must be positive, got {self.patch_size}", "use e.g. [1, 2, 2]")
        if self.eps <= 0:
            raise self.error("eps", f"must be positive, got {self.eps}", "use e.g. 1e-6")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split between (time, height, width) rotary components, as in Wan."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw


_PRESETS: dict[str, dict] = {
    "tiny": dict(),
    "wan2.1-1.3b": dict(in_channels=16, out_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                        text_dim=4096, text_len=512, freq_dim=256, vae="wan2.1"),
    "wan2.2-ti2v-5b": dict(in_channels=48, out_channels=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                           text_dim=4096, text_len=512, freq_dim=256, vae="wan2.2"),
    "wan2.1-14b": dict(in_channels=16, out_channels=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                       text_dim=4096, text_len=512, freq_dim=256, vae="wan2.1"),
}

PRESET_NAMES = tuple(_PRESETS)


def preset_config(name: str, **overrides) -> ModelConfig:
    """The official architecture numbers for `name`, with optional field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}. Fix: use one of {', '.join(PRESET_NAMES)}.")
    return ModelConfig(preset=name, **{**_PRESETS[name], **overrides})
