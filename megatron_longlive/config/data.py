"""Where training data comes from and how clips are shaped."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .base import ConfigBase


@dataclasses.dataclass
class DataConfig(ConfigBase):
    """Training data: a Zarr latent cache, raw videos, or the embedded synthetic generator."""

    _section: ClassVar[str] = "data"

    source: Literal["synthetic", "zarr", "videos"] = "synthetic"
    """`synthetic`: moving coloured shapes made on the fly; `zarr`: a preprocessed cache; `videos`: a folder."""
    path: str = ""
    """Zarr cache or video folder (unused for `synthetic`)."""
    height: int = 64
    """Pixel height of training clips (multiple of the VAE's spatial stride times the patch size)."""
    width: int = 64
    """Pixel width of training clips."""
    num_frames: int = 13
    """Pixel frames per clip; Wan VAEs need 1 + 4k."""
    fps: float = 8.0
    """Frames per second clips are sampled at."""
    num_videos: int = 16
    """Synthetic source only: how many videos to generate."""
    num_shots: int = 2
    """Synthetic source only: shots per video."""
    num_workers: int = 0
    """Loader worker processes."""
    seed: int = 0
    """Seed for synthetic data and shuffling."""

    def validate(self) -> None:
        if (self.num_frames - 1) % 4:
            raise self.error("num_frames", f"{self.num_frames} is not 1 + 4k (the Wan VAE's temporal grouping)",
                             f"use {1 + 4 * max(1, round((self.num_frames - 1) / 4))}")
        for name in ("height", "width", "num_videos", "num_shots"):
            if getattr(self, name) <= 0:
                raise self.error(name, f"must be positive, got {getattr(self, name)}", f"set data.{name} > 0")
        if self.source != "synthetic" and not self.path:
            raise self.error("path", f"source={self.source!r} needs a path", "set data.path to the cache or folder")
