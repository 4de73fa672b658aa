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
    buckets: list[list[int]] = dataclasses.field(default_factory=list)
    """Preprocess: resolution buckets [[height, width], ...]; each video goes to the closest aspect ratio (empty: [[height, width]])."""
    duration_groups: list[float] = dataclasses.field(default_factory=lambda: [16.0, 32.0, 64.0])
    """Preprocess: edges (seconds) of the cache's duration groups: 16-32 s, 32-64 s, > 64 s; shorter clips are rejected."""
    decoder: Literal["pyav", "dali", "dali-cpu", "auto"] = "pyav"
    """Preprocess: decoding backend (`dali` needs nvidia-dali and a GPU; `dali-cpu`: DALI's CPU decoder, VP8/VP9/MJPEG only; `auto` picks GPU DALI when importable)."""
    min_source_side: int = 64
    """Preprocess: reject videos whose width or height is below this many pixels."""
    shot_threshold: float = 27.0
    """Preprocess: HSV content-change score (0..255) that starts a new shot."""
    filters: dict[str, float] = dataclasses.field(default_factory=dict)
    """Preprocess: overrides of the filter thresholds by name (see dataloaders/filters.py FilterThresholds)."""
    quality_scorer: Literal["default", "maniqa", "none"] = "default"
    """Preprocess: visual-quality scorer; `maniqa` needs pyiqa and `quality_weights`."""
    quality_weights: str = ""
    """Preprocess: local weights file for the `maniqa` scorer (nothing is downloaded)."""
    captions: str = ""
    """Preprocess: JSONL/CSV caption manifest (per-shot captions); empty: look for manifest.jsonl in the video folder."""
    cache_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Preprocess: dtype latents and text embeddings are stored in (both stored losslessly)."""
    prefetch: int = 2
    """Zarr loader: items read ahead by the prefetch thread (0: read in the calling thread)."""

    def validate(self) -> None:
        if (self.num_frames - 1) % 4:
            raise self.error("num_frames", f"{self.num_frames} is not 1 + 4k (the Wan VAE's temporal grouping)",
                             f"use {1 + 4 * max(1, round((self.num_frames - 1) / 4))}")
        for name in ("height", "width", "num_videos", "num_shots"):
            if getattr(self, name) <= 0:
                raise self.error(name, f"must be positive, got {getattr(self, name)}", f"set data.{name} > 0")
        for b in self.buckets:
            if len(b) != 2 or min(b) <= 0:
                raise self.error("buckets", f"bucket {b} is not a positive [height, width] pair", "use e.g. [[480, 832]]")
        if not self.duration_groups or any(b <= a for a, b in zip(self.duration_groups, self.duration_groups[1:])):
            raise self.error("duration_groups", f"{self.duration_groups} must be non-empty and increasing",
                             "use e.g. [16, 32, 64]")
        if self.source != "synthetic" and not self.path:
            raise self.error("path", f"source={self.source!r} needs a path", "set data.path to the cache or folder")
