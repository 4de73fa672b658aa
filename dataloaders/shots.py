"""Shot boundaries from frame-difference statistics (content detection in HSV, as PySceneDetect does).

For consecutive frames, the score is the mean absolute difference of hue, saturation and value (each on
0..255; hue difference taken on the circle), averaged over the three channels. A cut is placed before
frame i when its score reaches `threshold` and the current shot already has `min_shot_frames` frames.
PySceneDetect itself was not used: its content detector needs OpenCV (a large binary dependency) for the
HSV conversion, which is a few lines of numpy here.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def rgb_to_hsv255(frames: np.ndarray) -> np.ndarray:
    """RGB uint8 `[..., 3]` -> HSV float32 `[..., 3]`, every channel scaled to 0..255."""
    x = frames.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    c = v - x.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, ((g - b) / safe) % 6.0, np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(c > 0, h / 6.0, 0.0)
    return np.stack([h, s, v], -1).astype(np.float32) * 255.0


def downscale(frames: np.ndarray, max_side: int = 64) -> np.ndarray:
    """Area-average `[T, H, W, C]` frames by an integer factor so the long side is <= max_side."""
    t, h, w, c = frames.shape
    f = max(1, -(-max(h, w) // max_side))
    if f == 1:
        return frames.astype(np.float32)
    h2, w2 = h // f, w // f
    x = frames[:, :h2 * f, :w2 * f].astype(np.float32).reshape(t, h2, f, w2, f, c)
    return x.mean((2, 4))


def content_scores(frames: np.ndarray, max_side: int = 64) -> np.ndarray:
    """Per-pair HSV content change `[T-1]` for RGB uint8 frames `[T, H, W, 3]`."""
    if frames.shape[0] < 2:
        return np.zeros(0, np.float32)
    hsv = rgb_to_hsv255(downscale(frames, max_side).round().astype(np.uint8))
    d = np.abs(np.diff(hsv, axis=0))  # [T-1, h, w, 3]
    d[..., 0] = np.minimum(d[..., 0], 255.0 - d[..., 0])  # hue wraps around
    return d.mean(axis=(1, 2)).mean(-1)


@dataclasses.dataclass
class ShotDetector:
    """Content detector: cut where the HSV change score >= `threshold` (0..255 scale)."""

    threshold: float = 27.0
    min_shot_frames: int = 4
    max_side: int = 64

    def detect(self, frames: np.ndarray) -> list[tuple[int, int]]:
        """Shots as `[(start, end), ...]` frame ranges (end exclusive) covering all of `frames`."""
        n = int(frames.shape[0])
        if n == 0:
            return []
        scores = content_scores(frames, self.max_side)
        cuts = [0]
        for i, s in enumerate(scores, start=1):  # score i-1 compares frames i-1 and i
            if s >= self.threshold and i - cuts[-1] >= self.min_shot_frames:
                cuts.append(i)
        cuts.append(n)
        return list(zip(cuts[:-1], cuts[1:]))
