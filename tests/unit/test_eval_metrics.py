"""Weight-free metrics on constructed videos whose answers are known, read back from real mp4 files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_longlive.eval import metrics as m
from megatron_longlive.eval import testvideos as tv
from megatron_longlive.eval.video_io import read_video, to_float
from megatron_longlive.inference.video_writer import Mp4Writer


def roundtrip(tmp_path, frames: np.ndarray, name: str = "v.mp4", crf: int = 0) -> np.ndarray:
    """Write float frames as an mp4 (x264 crf 0 = lossless in YUV) and decode them back to float."""
    path = tmp_path / name
    with Mp4Writer(path, fps=8, crf=crf) as w:
        w.write(tv.to_uint8(frames))
    return to_float(read_video(path))


def test_static_video_has_zero_flicker_and_motion(tmp_path):
    video = roundtrip(tmp_path, tv.static(6))
    fl = m.flicker(video)
    assert fl.value == 0.0 and fl.stats["max_abs_diff"] == 0.0 and fl.stats["brightness_flicker"] == 0.0
    mo = m.motion(video)
    # Farnebäck on two identical frames: |flow| stays below 1e-3 px (float rounding inside OpenCV)
    assert mo.value < 1e-3 and mo.stats["max_magnitude"] < 1e-3


def test_flicker_sees_strobing_and_not_a_linear_fade():
    base = tv.static(9)
    fade = tv.fade_to(base, 0.5)
    strobe = base * np.where(np.arange(9) % 2, 0.8, 1.0)[:, None, None, None]
    f_fade, f_strobe = m.flicker(fade), m.flicker(strobe)
    assert f_fade.value > 0  # frames do change
    assert f_fade.stats["brightness_flicker"] < 1e-9  # linear brightness ramp: zero second difference
    assert f_strobe.stats["brightness_flicker"] > 10 * 255 * 0.1 * 0.1
    # mean |f[t+1] - f[t]| of the strobe is exactly 0.2 * mean(base) in 8-bit units
    assert f_strobe.value == pytest.approx(0.2 * base.mean() * 255, rel=1e-5)


@pytest.mark.parametrize("dx,dy", [(2, 1), (-3, 0), (0, -2)])
def test_known_translation_gives_known_flow(tmp_path, dx, dy):
    video = roundtrip(tmp_path, tv.translating(6, dx, dy, 64, 64), crf=4)
    mo = m.motion(video)
    # stated tolerance: median vector within 0.1 px, mean magnitude within 0.3 px of the true shift
    assert mo.stats["median_dx"] == pytest.approx(dx, abs=0.1)
    assert mo.stats["median_dy"] == pytest.approx(dy, abs=0.1)
    assert mo.value == pytest.approx(math.hypot(dx, dy), abs=0.3)
    assert len(mo.series) == 5


def test_cuts_are_not_motion_or_flicker():
    video = np.concatenate([tv.static(5, seed=0), tv.static(5, seed=3)])
    assert m.flicker(video).stats["max_abs_diff"] > 10  # without shot starts the cut counts
    fl = m.flicker(video, shot_starts=[0, 5])
    assert fl.value == 0.0 and fl.stats["brightness_flicker"] == 0.0 and fl.stats["cut_pairs_left_out"] == 1
    assert math.isnan(fl.series[4]) and len(fl.series) == 9
    mo = m.motion(video, shot_starts=[0, 5])
    assert mo.value < 1e-3 and mo.stats["cut_pairs_left_out"] == 1 and math.isnan(mo.series[4])


def test_fade_to_gray_drifts_constant_does_not(tmp_path):
    const = roundtrip(tmp_path, tv.static(20), "c.mp4")
    fade = roundtrip(tmp_path, tv.fade_to(tv.static(20), 0.5), "f.mp4", crf=10)
    d_const, d_fade = m.drift(const), m.drift(fade)
    assert d_const.value == 0.0 and d_const.stats["contrast_change"] == 0.0
    assert max(d_const.series) == 0.0
    assert d_fade.value > 0.5
    assert d_fade.stats["contrast_change"] < -15  # flat gray at the end: contrast collapses
    assert d_fade.stats["saturation_change"] < -30
    assert d_fade.series[-1] > d_fade.series[len(d_fade.series) // 2] > d_fade.series[0] - 1e-12


def test_drift_is_measured_within_shots():
    # two static shots of different subjects: the whole video "drifts", each shot does not
    video = np.concatenate([tv.static(10, seed=0), tv.static(10, seed=5)[..., ::-1]])
    assert m.drift(video).value > 0.1
    per_shot = m.drift(video, shot_starts=[0, 10])
    assert per_shot.value == 0.0 and per_shot.stats["num_shots"] == 2 and len(per_shot.series) == 20
    faded_second = np.concatenate([video[:10], tv.fade_to(video[10:], 0.5)])
    r = m.drift(faded_second, shot_starts=[0, 10])
    assert r.stats["max_shot_hist_distance"] > 0.3 and max(r.series[:10]) == 0.0
    short = m.drift(video, shot_starts=[0, 19])  # a 1-frame shot has no early/late windows: left out
    assert short.stats["short_shots_left_out"] == 1 and math.isnan(short.series[-1])
    assert m.drift(video[:1]).skipped


def test_latent_drift():
    g = torch.Generator().manual_seed(0)
    sink = torch.randn(1, 4, 6, 6, generator=g)
    const = sink.repeat(10, 1, 1, 1)
    r = m.latent_drift(const)
    assert r.value == 0.0 and max(r.series) == 0.0
    noise = torch.randn(10, 4, 6, 6, generator=g)
    ramp = torch.linspace(0, 1, 10).view(10, 1, 1, 1)
    drifting = sink + ramp * noise
    r = m.latent_drift(drifting)
    expect = float(((noise[-1]) ** 2).sum() / (sink ** 2).sum())  # last frame: ||noise||^2 / ||sink||^2
    assert r.series[-1] == pytest.approx(expect, rel=1e-6)
    assert r.value > r.stats["early_rel_distance"]
    assert m.latent_drift(const[:1]).skipped


def test_sharpness_drops_when_blurred_and_matches_opencv():
    import cv2

    video = tv.static(3)
    sharp, blurred = m.sharpness(video), m.sharpness(tv.blur(video, 2.0))
    assert blurred.value < 0.5 * sharp.value
    y = (video[0] @ np.array([0.299, 0.587, 0.114])) * 255.0
    ref = cv2.Laplacian(y, cv2.CV_64F, ksize=1)[1:-1, 1:-1].var()
    assert sharp.series[0] == pytest.approx(ref, rel=1e-9)


def test_exposure():
    black = np.zeros((2, 16, 16, 3))
    white = np.ones((2, 16, 16, 3))
    assert m.exposure(black).stats["dark_fraction"] == 1.0 and m.exposure(black).value == 0.0
    assert m.exposure(white).stats["bright_fraction"] == 1.0 and m.exposure(white).value == pytest.approx(255.0)


def test_shot_consistency_same_subject_beats_new_subject():
    same = m.shot_consistency(tv.two_shots(16, 8, same_subject=True), [0, 8])
    other = m.shot_consistency(tv.two_shots(16, 8, same_subject=False), [0, 8])
    assert same.stats["num_switches"] == 1
    assert same.value > other.value + 0.2
    assert same.stats["lowfreq_similarity"] > other.stats["lowfreq_similarity"]
    assert m.shot_consistency(tv.static(4), [0]).skipped
    with pytest.raises(ValueError, match="outside"):
        m.shot_consistency(tv.static(4), [0, 9])


def test_identical_runs_infinite_psnr_and_unit_ssim(tmp_path):
    a = roundtrip(tmp_path, tv.translating(4, 1, 1, 32, 32), "a.mp4")
    b = roundtrip(tmp_path, tv.translating(4, 1, 1, 32, 32), "b.mp4")
    assert m.psnr(a, b).value == math.inf and all(p == math.inf for p in m.psnr(a, b).series)
    assert m.ssim(a, b).value == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value():
    a = np.full((2, 8, 8, 3), 0.5)
    b = a + 0.01  # MSE 1e-4 -> 40 dB
    assert m.psnr(a, b).value == pytest.approx(40.0, abs=1e-9)


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = tv.translating(3, 1, 0, 40, 36)
    b = np.clip(tv.blur(a, 1.0) + rng.normal(0, 0.03, a.shape), 0, 1)
    ours = m.ssim(a, b).series
    ref = [skm.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0, channel_axis=-1) for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)
    assert 0.3 < min(ours) < 0.99


def test_latent_error():
    a = torch.zeros(3, 2, 4, 4)
    b = a.clone()
    b[1] = 1.0
    r = m.latent_error(a, b)
    assert r.series == [0.0, 1.0, 0.0] and r.value == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        m.latent_error(a, b[:2])


def test_lpips_skips_with_reason_when_weights_absent():
    if m.lpips_status() is None:
        pytest.skip("LPIPS weights are present locally; the skip path cannot be shown here")
    r = m.lpips(tv.static(2, 16, 16), tv.static(2, 16, 16))
    assert r.value is None and ("lpips" in r.skipped.lower())
