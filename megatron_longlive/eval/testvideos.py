"""Constructed videos whose metric values are known: the evaluator's tests and its example report use them.

All return float frames [T, H, W, 3] in [0, 1] (write them with `inference.video_writer.write_mp4` after
`to_uint8`). Everything is a deterministic function of the arguments.
"""
from __future__ import annotations

import numpy as np


def texture(height: int, width: int, seed: int = 0, scale: float = 4.0) -> np.ndarray:
    """Smooth coloured random texture [H, W, 3] in [0.1, 0.9] (blurred noise: good for optical flow)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, 3))
    radius = max(1, int(2 * scale))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-(x ** 2) / (2 * scale ** 2))
    k /= k.sum()
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda v: np.convolve(np.pad(v, radius, mode="wrap"), k, "valid"), axis, noise)
    lo, hi = noise.min(axis=(0, 1)), noise.max(axis=(0, 1))
    return 0.1 + 0.8 * (noise - lo) / (hi - lo)


def static(num_frames: int, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.repeat(texture(height, width, seed)[None], num_frames, axis=0)


def translating(num_frames: int, dx: int, dy: int, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """Windows of a larger texture such that content moves by (+dx, +dy) pixels per frame."""
    pad_y, pad_x = abs(dy) * num_frames, abs(dx) * num_frames
    big = texture(height + pad_y, width + pad_x, seed)
    y0 = pad_y if dy > 0 else 0
    x0 = pad_x if dx > 0 else 0
    # content moving right = the window moving left over the texture
    return np.stack([big[y0 - dy * t:y0 - dy * t + height, x0 - dx * t:x0 - dx * t + width]
                     for t in range(num_frames)])


def fade_to(frames: np.ndarray, level: float = 0.5, start: int = 0) -> np.ndarray:
    """Blend linearly from the frames (until `start`) to a flat `level` gray at the last frame."""
    t = frames.shape[0]
    alpha = np.clip((np.arange(t) - start) / max(t - 1 - start, 1), 0, 1)[:, None, None, None]
    return (1 - alpha) * frames + alpha * level


def blur(frames: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian blur of every frame (separable, reflect borders)."""
    radius = max(1, int(3 * sigma))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    k /= k.sum()
    out = frames
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        out = sum(k[i] * np.take(padded, np.arange(i, i + frames.shape[axis]), axis=axis) for i in range(len(k)))
    return out


def two_shots(num_frames: int, switch: int, same_subject: bool, height: int = 64, width: int = 64) -> np.ndarray:
    """Two shots switching at frame `switch`: the second shows the same textured subject slightly moved
    (same_subject) or a different texture with swapped colour channels (a different subject)."""
    first = translating(num_frames, 1, 0, height, width, seed=0)
    if same_subject:
        second = translating(num_frames, 0, 1, height, width, seed=0)
    else:
        second = translating(num_frames, 0, 1, height, width, seed=7)[..., ::-1] ** 2
    return np.concatenate([first[:switch], second[switch:]])


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)
