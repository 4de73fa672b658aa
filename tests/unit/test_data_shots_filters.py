"""Shot detection (HSV content change) and the per-shot filters, each against an independent reference."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest

from dataloaders.filters import (FilterThresholds, PyiqaScorer, SharpnessContrastScorer, build_scorer, filter_shot,
                                 laplacian_variance, phase_correlation_shift)
from dataloaders.shots import ShotDetector, rgb_to_hsv255


def test_hsv_matches_colorsys():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    px[:4] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 10, 10]]
    ours = rgb_to_hsv255(px)
    ref = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in px.astype(np.float64)]) * 255
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    return np.kron(small, np.ones((size // 8, size // 8, 1))).astype(np.uint8)


def panned(base: np.ndarray, n: int, step: float, jitter: float = 0.0) -> np.ndarray:
    return np.stack([np.roll(base, int(round(i * step + jitter * (-1) ** i)), axis=1) for i in range(n)])


def test_shot_detector_finds_the_cuts():
    frames = np.concatenate([panned(texture(s), n, 1) for s, n in [(1, 10), (2, 7), (3, 12)]])
    assert ShotDetector(threshold=27, min_shot_frames=3).detect(frames) == [(0, 10), (10, 17), (17, 29)]
    # a cut closer than min_shot_frames to the previous one is not taken
    assert ShotDetector(threshold=27, min_shot_frames=8).detect(frames) == [(0, 10), (10, 29)]
    assert ShotDetector().detect(frames[:1]) == [(0, 1)]


def test_laplacian_variance_matches_loops():
    rng = np.random.default_rng(1)
    g = rng.random((2, 6, 7)).astype(np.float32) * 255
    ref = []
    for f in g.astype(np.float64):
        lap = [f[y - 1, x] + f[y + 1, x] + f[y, x - 1] + f[y, x + 1] - 4 * f[y, x]
               for y in range(1, 5) for x in range(1, 6)]
        ref.append(np.var(lap))
    np.testing.assert_allclose(laplacian_variance(g), ref, rtol=1e-5)


@pytest.mark.parametrize("dy,dx", [(0, 3), (2, -5), (-4, 1)])
def test_phase_correlation_recovers_shift(dy, dx):
    a = texture(5).mean(-1)
    b = np.roll(a, (dy, dx), axis=(0, 1))
    got = phase_correlation_shift(a, b)
    assert abs(got[0] - dy) < 0.5 and abs(got[1] - dx) < 0.5


TH = FilterThresholds(min_shot_seconds=1.0, min_source_fps=5)


def reasons(frames, fps=8, source_fps=25):
    return filter_shot(frames, fps, TH, source_fps, SharpnessContrastScorer())[0]


def test_good_shot_passes_and_each_filter_fires():
    base = texture(7, 96)
    good = panned(base, 16, 1)[:, 16:80, 16:80]
    assert reasons(good) == []
    assert reasons(good[:6]) == ["shot_too_short"]
    assert reasons(np.repeat(good[:1], 16, 0)) == ["frozen_frames"]
    assert "abnormal_playback_speed" in reasons(np.repeat(good[::2], 2, 0))  # every frame doubled: slow motion
    assert "abnormal_playback_speed" in reasons(panned(base, 16, 14)[:, 16:80, 16:80])  # > 1 diagonal/s
    assert "abnormal_playback_speed" in reasons(good, source_fps=240)
    assert "underexposed" in reasons((good * 0.05).astype(np.uint8))
    assert "overexposed" in reasons(np.clip(good.astype(int) + 230, 0, 255).astype(np.uint8))
    assert reasons(panned(base, 16, 0, jitter=3)[:, 16:80, 16:80]) == ["camera_shake"]
    ramp = np.broadcast_to(np.linspace(0, 255, 64)[None, None, :, None], (16, 64, 64, 3))
    blurred = (ramp + np.arange(16)[:, None, None, None] * 2).clip(0, 255).astype(np.uint8)  # smooth, moving
    assert "blurry" in reasons(blurred)
    low = filter_shot(good, 8, FilterThresholds(min_shot_seconds=1, min_source_fps=5, min_quality=0.99), 25,
                      SharpnessContrastScorer())[0]
    assert low == ["low_quality"]


def test_threshold_overrides_and_scorers():
    assert FilterThresholds.from_overrides({"max_shake": 1}).max_shake == 1.0
    with pytest.raises(ValueError, match="unknown threshold"):
        FilterThresholds.from_overrides({"max_shaek": 1})
    assert build_scorer("none") is None
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyiqa"):
            PyiqaScorer("maniqa", weights="/nonexistent.pth")
    else:
        with pytest.raises(FileNotFoundError, match="quality_weights"):
            PyiqaScorer("maniqa", weights="/nonexistent.pth")
