"""Per-shot quality filters (the LongLive-2.0 list) with named rejection reasons and recorded scores.

Each shot (RGB uint8 frames `[T, h, w, 3]` sampled at `fps`) gets a dict of scores and a list of
reasons; a shot is kept when the list is empty. Measures, all on luma (BT.601, 0..255):

* `duration_s`                 shorter than `min_shot_seconds` -> `shot_too_short`
* `motion`   mean |Y_t - Y_t-1| below `min_motion` -> `low_motion`
* `frozen_ratio` share of frame pairs with change < `frozen_eps`, above `max_frozen_ratio` -> `frozen_frames`
* playback speed: a source fps outside [min_source_fps, max_source_fps], a repeated-frame share in
  [min_dup_ratio, max_frozen_ratio] (frame doubling = slowed playback), or a global motion faster than
  `max_pan_speed` frame diagonals per second (sped-up footage) -> `abnormal_playback_speed`
* `brightness` mean luma and clipped-pixel shares -> `underexposed` / `overexposed`
* `sharpness`  variance of the 4-neighbour Laplacian, below `min_sharpness` -> `blurry`
* `shake`  frame-to-frame change of the global translation (phase correlation between non-repeated
  frames), as a fraction of the frame diagonal; smooth pans score ~0 -> `camera_shake`
* `quality` from a pluggable `QualityScorer` (cheap default; pyiqa MANIQA when installed with local
  weights), below `min_quality` -> `low_quality`
"""
from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np
import torch

REASONS = {
    "shot_too_short": "shot shorter than min_shot_seconds",
    "low_motion": "mean frame change below min_motion",
    "frozen_frames": "too many frames identical to their predecessor",
    "abnormal_playback_speed": "source fps out of range, doubled frames (slow motion) or a sped-up camera",
    "underexposed": "too dark",
    "overexposed": "too bright",
    "blurry": "variance of Laplacian below min_sharpness",
    "camera_shake": "high-frequency global motion above max_shake",
    "low_quality": "quality scorer below min_quality",
}


@dataclasses.dataclass
class FilterThresholds:
    """Rejection thresholds (luma on 0..255). Override by name through `data.filters`."""

    min_shot_seconds: float = 2.0
    min_motion: float = 0.3
    frozen_eps: float = 0.25
    max_frozen_ratio: float = 0.8
    min_dup_ratio: float = 0.3
    min_source_fps: float = 10.0
    max_source_fps: float = 120.0
    max_pan_speed: float = 1.0
    min_brightness: float = 20.0
    max_brightness: float = 235.0
    max_clipped_ratio: float = 0.6
    min_sharpness: float = 5.0
    max_shake: float = 0.02
    min_quality: float = 0.0

    @classmethod
    def from_overrides(cls, overrides: dict[str, float]) -> "FilterThresholds":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"data.filters: unknown threshold(s) {bad}. Fix: use names among {sorted(names)}")
        return cls(**{k: float(v) for k, v in overrides.items()})


def luma(frames: np.ndarray) -> np.ndarray:
    """RGB uint8 `[T, H, W, 3]` -> float32 luma `[T, H, W]` (BT.601)."""
    f = frames.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def laplacian_variance(gray: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian per frame, `[T, H, W]` -> `[T]` (the classic blur measure)."""
    lap = (gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:] - 4 * gray[:, 1:-1, 1:-1])
    return lap.reshape(lap.shape[0], -1).var(axis=1)


def phase_correlation_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Integer-plus-parabolic-subpixel translation (dy, dx) with b(x) ~= a(x - shift), via phase correlation."""
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1])).astype(np.float32)
    fa, fb = np.fft.fft2((a - a.mean()) * win), np.fft.fft2((b - b.mean()) * win)
    r = fb * np.conj(fa)
    r /= np.maximum(np.abs(r), 1e-9)
    c = np.real(np.fft.ifft2(r))
    py, px = np.unravel_index(int(np.argmax(c)), c.shape)
    h, w = c.shape

    def sub(m1, m0, p1):
        d = m1 - 2 * m0 + p1
        return 0.0 if abs(d) < 1e-12 else 0.5 * (m1 - p1) / d

    dy = py + sub(c[(py - 1) % h, px], c[py, px], c[(py + 1) % h, px])
    dx = px + sub(c[py, (px - 1) % w], c[py, px], c[py, (px + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return float(dy), float(dx)


def global_steps(gray: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Global translation `[n, 2]` (dy, dx) between consecutive frames, over the pairs flagged `moving`."""
    return np.array([phase_correlation_shift(gray[i], gray[i + 1]) for i in np.flatnonzero(moving)]).reshape(-1, 2)


def camera_shake(steps: np.ndarray, diag: float) -> float:
    """Jitter of the camera path as a fraction of the frame diagonal (0 for still cameras and smooth pans)."""
    if steps.shape[0] < 3:
        return 0.0
    jitter = np.diff(steps, axis=0)  # a smooth pan has near-constant steps; shake flips direction
    return float(np.sqrt((jitter ** 2).sum(-1).mean())) / diag


class QualityScorer(Protocol):
    """Visual quality of a shot in [0, 1] (higher is better)."""

    name: str

    def score(self, frames: np.ndarray) -> float: ...


class SharpnessContrastScorer:
    """Cheap no-reference default: saturating sharpness (Laplacian variance) times contrast (luma std)."""

    name = "sharpness_contrast"

    def __init__(self, sharpness_ref: float = 100.0, contrast_ref: float = 40.0, max_frames: int = 8):
        self.sharpness_ref, self.contrast_ref, self.max_frames = sharpness_ref, contrast_ref, max_frames

    def score(self, frames: np.ndarray) -> float:
        idx = np.linspace(0, frames.shape[0] - 1, min(self.max_frames, frames.shape[0])).round().astype(int)
        gray = luma(frames[idx])
        sharp = float(np.median(laplacian_variance(gray))) if min(gray.shape[1:]) >= 3 else 0.0
        contrast = float(gray.reshape(gray.shape[0], -1).std(axis=1).mean())
        return float(np.tanh(sharp / self.sharpness_ref) * np.tanh(contrast / self.contrast_ref))


class PyiqaScorer:
    """MANIQA (or another pyiqa metric) on a few frames; needs `pyiqa` and a local weights file."""

    def __init__(self, metric: str = "maniqa", weights: str = "", device: str = "cpu", max_frames: int = 4):
        try:
            import pyiqa
        except ImportError:
            raise ImportError("quality scorer 'maniqa' needs the pyiqa package. Fix: pip install pyiqa, or use "
                              "data.quality_scorer=default") from None
        if not weights or not os.path.isfile(weights):
            raise FileNotFoundError(f"quality scorer {metric!r}: weights file {weights!r} not found (nothing is "
                                    "downloaded). Fix: set data.quality_weights to a local MANIQA .pth file")
        self.name = f"pyiqa:{metric}"
        self.metric = pyiqa.create_metric(metric, device=device, pretrained_model_path=weights)
        self.device, self.max_frames = device, max_frames

    @torch.no_grad()
    def score(self, frames: np.ndarray) -> float:
        idx = np.linspace(0, frames.shape[0] - 1, min(self.max_frames, frames.shape[0])).round().astype(int)
        x = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float().div(255).to(self.device)  # [n, 3, h, w]
        return float(self.metric(x).mean())


def build_scorer(name: str, weights: str = "", device: str = "cpu") -> QualityScorer | None:
    """`default` (cheap), `maniqa` (pyiqa, local weights), or `none`."""
    if name == "none":
        return None
    if name == "default":
        return SharpnessContrastScorer()
    if name == "maniqa":
        return PyiqaScorer("maniqa", weights, device)
    raise ValueError(f"data.quality_scorer: unknown scorer {name!r}. Fix: use default, maniqa or none")


def measure(frames: np.ndarray, fps: float, source_fps: float = 0.0, scorer: QualityScorer | None = None,
            frozen_eps: float = 0.25) -> dict[str, float]:
    """All scores of one shot: frames `[T, h, w, 3]` uint8 sampled at `fps`."""
    t = frames.shape[0]
    gray = luma(frames)  # [T, h, w]
    diffs = np.abs(np.diff(gray, axis=0)).reshape(max(t - 1, 0), -1).mean(1) if t > 1 else np.zeros(0)
    f = max(1, max(gray.shape[1:]) // 128)  # global motion is scale-free: measure it on <= ~128 px frames
    small = gray[:, :gray.shape[1] // f * f, :gray.shape[2] // f * f]
    small = small.reshape(t, small.shape[1] // f, f, small.shape[2] // f, f).mean((2, 4))
    diag = float(np.hypot(*small.shape[1:]))
    steps = global_steps(small, diffs >= frozen_eps)  # [n, 2] in small-frame pixels
    scores = {
        "duration_s": t / fps,
        "motion": float(diffs.mean()) if diffs.size else 0.0,
        "frozen_ratio": float((diffs < frozen_eps).mean()) if diffs.size else 0.0,
        "pan_speed": float(np.median(np.hypot(steps[:, 0], steps[:, 1]))) * fps / diag if steps.size else 0.0,
        "source_fps": float(source_fps),
        "brightness": float(gray.mean()),
        "dark_ratio": float((gray < 16).mean()),
        "bright_ratio": float((gray > 239).mean()),
        "sharpness": float(np.median(laplacian_variance(gray))) if min(gray.shape[1:]) >= 3 else 0.0,
        "shake": camera_shake(steps, diag),
    }
    return scores | ({"quality": float(scorer.score(frames))} if scorer is not None else {})


def judge(scores: dict[str, float], th: FilterThresholds) -> list[str]:
    """Reasons (keys of `REASONS`) the scores fail; empty when the shot passes."""
    r = []
    if scores["duration_s"] + 1e-9 < th.min_shot_seconds:
        r.append("shot_too_short")
    fr = scores["frozen_ratio"]
    if fr > th.max_frozen_ratio:
        r.append("frozen_frames")
    elif scores["motion"] < th.min_motion:
        r.append("low_motion")
    sfps = scores["source_fps"]
    if (sfps and not th.min_source_fps <= sfps <= th.max_source_fps) or th.min_dup_ratio <= fr <= th.max_frozen_ratio \
            or scores["pan_speed"] > th.max_pan_speed:
        r.append("abnormal_playback_speed")
    if scores["brightness"] < th.min_brightness or scores["dark_ratio"] > th.max_clipped_ratio:
        r.append("underexposed")
    if scores["brightness"] > th.max_brightness or scores["bright_ratio"] > th.max_clipped_ratio:
        r.append("overexposed")
    if scores["sharpness"] < th.min_sharpness:
        r.append("blurry")
    if scores["shake"] > th.max_shake:
        r.append("camera_shake")
    if "quality" in scores and scores["quality"] < th.min_quality:
        r.append("low_quality")
    return r


def filter_shot(frames: np.ndarray, fps: float, th: FilterThresholds, source_fps: float = 0.0,
                scorer: QualityScorer | None = None) -> tuple[list[str], dict[str, float]]:
    """(reasons, scores) of one shot."""
    scores = measure(frames, fps, source_fps, scorer, th.frozen_eps)
    return judge(scores, th), scores
