"""Weight-free video metrics: they need no downloaded model, so they run everywhere (CI included).

Inputs are float frames `[T, H, W, 3]` in [0, 1] (`video_io.to_float`) and latents `[T, C, h, w]`.
Intensity-valued numbers are reported in 8-bit units (0..255) so they read like pixel values.
Every function returns one or more `MetricResult`: a headline `value`, secondary `stats`, and a `series`
over time (per frame or per frame pair) that the report plots for long videos.

- flicker: statistics of |f[t+1] - f[t]| and of the second difference of mean brightness (a linear fade
  has none; strobing has a lot).
- drift: early window vs late window (brightness, contrast, saturation, Hellinger distance of colour
  histograms); the series is each frame's histogram distance to the early window.
- latent_drift: relative squared distance of every latent frame to the first shot's sink frames.
- motion: dense optical flow (OpenCV Farnebäck) between consecutive frames: magnitude and mean vector.
- sharpness (variance of the Laplacian) and exposure (mean luma, clipped fractions).
- shot_consistency: colour-histogram and low-frequency (8x8 thumbnail) similarity across each shot switch.
- psnr / ssim (Gaussian-window SSIM of Wang et al. 2004, the settings of skimage's `gaussian_weights=True`)
  / latent_error between two runs; lpips only when the `lpips` package and its backbone weights are local.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from .video_io import luminance


@dataclasses.dataclass
class MetricResult:
    """One metric of one video (or one pair of videos)."""

    name: str
    value: float | None
    """Headline number; None when skipped."""
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    series: list[float] | None = None
    """Values over time, for plots (per frame, per frame pair or per latent frame; see `series_axis`)."""
    series_axis: str = "frame"
    skipped: str | None = None
    """Why the metric was not computed (missing package/weights, too few frames)."""

    @classmethod
    def skip(cls, name: str, reason: str) -> "MetricResult":
        return cls(name=name, value=None, skipped=reason)


def _check_frames(frames: np.ndarray, min_frames: int = 1) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"need at least {min_frames} frames, got {frames.shape[0]}")


# ---------------------------------------------------------------------------------------------------------
# Single-video metrics
# ---------------------------------------------------------------------------------------------------------
def crosses_cut(t: int, stride: int, shot_starts: list[int] | None) -> bool:
    """True when the frame pair (t, t + stride) spans a shot switch (a cut is not motion or flicker)."""
    return any(t < s <= t + stride for s in shot_starts or ())


def flicker(frames: np.ndarray, shot_starts: list[int] | None = None) -> MetricResult:
    """Frame-difference statistics (0..255). Zero for a static video. Pairs across a shot switch are
    left out of the statistics (NaN in the series); so are brightness second differences touching one."""
    _check_frames(frames)
    if frames.shape[0] < 2:
        return MetricResult.skip("flicker", "needs at least 2 frames")
    diffs = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)) * 255.0  # [T-1]
    cut = np.array([crosses_cut(t, 1, shot_starts) for t in range(len(diffs))])
    if cut.all():
        return MetricResult.skip("flicker", "every frame pair spans a shot switch")
    diffs[cut] = np.nan
    brightness = luminance(frames).mean(axis=(1, 2)) * 255.0  # [T]
    jerk = np.abs(np.diff(brightness, n=2))  # [T-2]; jerk[t] uses pairs t and t+1
    jerk = jerk[~(cut[:-1] | cut[1:])] if len(jerk) else jerk
    ok = diffs[~cut]
    stats = {"mean_abs_diff": float(ok.mean()), "p95_abs_diff": float(np.percentile(ok, 95)),
             "max_abs_diff": float(ok.max()), "brightness_flicker": float(jerk.mean()) if len(jerk) else 0.0,
             "cut_pairs_left_out": float(cut.sum())}
    return MetricResult("flicker", stats["mean_abs_diff"], stats, diffs.tolist(), "frame pair")


def color_histogram(frames: np.ndarray, bins: int = 32) -> np.ndarray:
    """Pooled per-channel histogram of frames [N, H, W, 3] in [0, 1] -> [3, bins], each row sums to 1."""
    idx = np.clip((frames * bins).astype(np.int64), 0, bins - 1)
    hist = np.stack([np.bincount(idx[..., c].ravel(), minlength=bins) for c in range(3)]).astype(np.float64)
    return hist / hist.sum(axis=1, keepdims=True)


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of histograms [3, bins], averaged over channels: 0 identical, 1 disjoint."""
    bc = np.sqrt(p * q).sum(axis=1)
    return float(np.sqrt(np.clip(1.0 - bc, 0.0, None)).mean())


def _saturation(frames: np.ndarray) -> np.ndarray:
    return frames.max(axis=-1) - frames.min(axis=-1)


def default_window(num_frames: int) -> int:
    """Early/late window length: 10% of the video, at least 1 frame."""
    return max(1, round(0.1 * num_frames))


def _drift_segment(frames: np.ndarray, w: int, bins: int) -> tuple[dict[str, float], list[float]]:
    early, late = frames[:w], frames[-w:]
    ref = color_histogram(early, bins)
    series = [hellinger(color_histogram(f[None], bins), ref) for f in frames]
    le, ll = luminance(early), luminance(late)
    stats = {"hist_distance": hellinger(color_histogram(late, bins), ref),
             "brightness_change": float((ll.mean() - le.mean()) * 255.0),
             "contrast_change": float((ll.std() - le.std()) * 255.0),
             "saturation_change": float((_saturation(late).mean() - _saturation(early).mean()) * 255.0)}
    return stats, series


def drift(frames: np.ndarray, window: int | None = None, bins: int = 32,
          shot_starts: list[int] | None = None) -> MetricResult:
    """Early-vs-late change. Headline: Hellinger distance between the windows' colour histograms.

    With shot starts, drift is measured inside each shot (a new shot may legitimately look different) and
    the stats are means over shots; the series is each frame's distance to its own shot's early window."""
    _check_frames(frames)
    t = frames.shape[0]
    starts = sorted({0, *(s for s in (shot_starts or []) if 0 < s < t)})
    segments = [(a, b) for a, b in zip(starts, starts[1:] + [t])]
    per_shot, series = [], []
    for a, b in segments:
        w = window or default_window(b - a)
        if 2 * w > b - a:  # too short for an early and a late window: left out (NaN in the series)
            series += [math.nan] * (b - a)
            continue
        stats, seg_series = _drift_segment(frames[a:b], w, bins)
        per_shot.append(stats)
        series += seg_series
    if not per_shot:
        return MetricResult.skip("drift", f"no shot is long enough for an early and a late window "
                                 f"(shots {segments}, window {window or 'default 10%'})")
    stats = {k: float(np.mean([s[k] for s in per_shot])) for k in per_shot[0]}
    stats["max_shot_hist_distance"] = float(max(s["hist_distance"] for s in per_shot))
    stats["num_shots"] = float(len(per_shot))
    stats["short_shots_left_out"] = float(len(segments) - len(per_shot))
    return MetricResult("drift", stats["hist_distance"], stats, series)


def latent_drift(latents: torch.Tensor, sink_frames: int = 1, window: int | None = None) -> MetricResult:
    """||z_t - s||^2 / ||s||^2 per latent frame, s = mean of the first `sink_frames` latent frames
    (the first shot's sink). Headline: mean over the late window."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [T, C, h, w], got {tuple(latents.shape)}")
    t = latents.shape[0]
    if sink_frames < 1 or sink_frames >= t:
        return MetricResult.skip("latent_drift", f"sink_frames={sink_frames} needs more than {sink_frames} "
                                 f"latent frames, got {t}")
    z = latents.double()
    sink = z[:sink_frames].mean(0)
    rel = ((z - sink) ** 2).flatten(1).sum(1) / (sink ** 2).sum().clamp_min(1e-12)  # [T]
    cos = torch.nn.functional.cosine_similarity(z.flatten(1), sink.flatten()[None], dim=1)
    w = window or default_window(t - sink_frames)
    after = rel[sink_frames:]
    stats = {"late_rel_distance": float(after[-w:].mean()), "early_rel_distance": float(after[:w].mean()),
             "late_cosine": float(cos[-w:].mean()), "sink_frames": float(sink_frames)}
    return MetricResult("latent_drift", stats["late_rel_distance"], stats, rel.tolist(), "latent frame")


def _gray_u8(frame: np.ndarray) -> np.ndarray:
    return np.clip(luminance(frame) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def optical_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Farnebäck flow from frame `prev` to `nxt` ([H, W, 3] in [0, 1]) -> [H, W, 2] (dx, dy) pixels:
    content at (x, y) in `prev` is at (x + dx, y + dy) in `nxt`."""
    import cv2

    return cv2.calcOpticalFlowFarneback(_gray_u8(prev), _gray_u8(nxt), None, pyr_scale=0.5, levels=3,
                                        winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def motion(frames: np.ndarray, stride: int = 1, border: int = 8, progress: bool = False,
           shot_starts: list[int] | None = None) -> MetricResult:
    """Mean optical-flow magnitude (pixels per frame pair) and the median flow vector, from frame pairs
    (t, t + stride), ignoring `border` pixels at each edge (flow is unreliable where content enters).
    Pairs across a shot switch are left out (NaN in the series)."""
    _check_frames(frames)
    try:
        import cv2  # noqa: F401
    except ImportError:
        return MetricResult.skip("motion", "opencv is not installed (pip install opencv-python-headless)")
    if frames.shape[0] <= stride:
        return MetricResult.skip("motion", f"needs more than {stride} frames")
    h, w = frames.shape[1:3]
    b = border if min(h, w) > 4 * border else 0
    mags, dxs, dys = [], [], []
    pairs = range(0, frames.shape[0] - stride, stride)
    for t in tqdm(pairs, desc="optical flow", disable=not progress, leave=False):
        if crosses_cut(t, stride, shot_starts):
            mags.append(math.nan)
            continue
        flow = optical_flow(frames[t], frames[t + stride])[b:h - b, b:w - b] / stride
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
        dxs.append(float(np.median(flow[..., 0])))
        dys.append(float(np.median(flow[..., 1])))
    if not dxs:
        return MetricResult.skip("motion", "every frame pair spans a shot switch")
    ok = [v for v in mags if not math.isnan(v)]
    stats = {"mean_magnitude": float(np.mean(ok)), "max_magnitude": float(np.max(ok)),
             "median_dx": float(np.median(dxs)), "median_dy": float(np.median(dys)),
             "cut_pairs_left_out": float(len(mags) - len(ok))}
    return MetricResult("motion", stats["mean_magnitude"], stats, mags, "frame pair")


def laplacian_variance(frame: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luma (0..255 scale); high = sharp."""
    y = luminance(frame).astype(np.float64) * 255.0
    lap = -4 * y[1:-1, 1:-1] + y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:]
    return float(lap.var())


def sharpness(frames: np.ndarray) -> MetricResult:
    _check_frames(frames)
    per_frame = [laplacian_variance(f) for f in frames]
    w = default_window(len(per_frame))
    stats = {"mean": float(np.mean(per_frame)), "min": float(np.min(per_frame)),
             "late_over_early": float(np.mean(per_frame[-w:]) / max(np.mean(per_frame[:w]), 1e-12))}
    return MetricResult("sharpness", stats["mean"], stats, per_frame)


def exposure(frames: np.ndarray, dark: float = 5 / 255, bright: float = 250 / 255) -> MetricResult:
    """Mean luma (0..255) and fractions of pixels clipped dark / bright."""
    _check_frames(frames)
    y = luminance(frames)
    per_frame = (y.mean(axis=(1, 2)) * 255.0).tolist()
    stats = {"mean_luma": float(np.mean(per_frame)), "dark_fraction": float((y <= dark).mean()),
             "bright_fraction": float((y >= bright).mean())}
    return MetricResult("exposure", stats["mean_luma"], stats, per_frame)


def _thumbnail(frames: np.ndarray, size: int = 8) -> np.ndarray:
    """Mean of frames [N, H, W, 3] reduced to [size, size, 3] by area averaging (low frequencies only)."""
    m = frames.mean(axis=0)
    h, w = m.shape[:2]
    ys = np.linspace(0, h, size + 1).astype(int)
    xs = np.linspace(0, w, size + 1).astype(int)
    return np.array([[m[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(axis=(0, 1)) for j in range(size)]
                     for i in range(size)])


def shot_consistency(frames: np.ndarray, shot_starts: list[int], window: int = 4) -> MetricResult:
    """Similarity of the `window` frames before and after each shot switch (1 = identical look):
    colour-histogram similarity 1 - Hellinger, and low-frequency similarity 1 - mean |thumb_a - thumb_b|."""
    _check_frames(frames)
    t = frames.shape[0]
    bad = [s for s in shot_starts if not 0 <= s < t]
    if bad:
        raise ValueError(f"shot starts {bad} lie outside the video's {t} frames")
    boundaries = sorted(s for s in set(shot_starts) if s > 0)
    if not boundaries:
        return MetricResult.skip("shot_consistency", "no shot switch (give shot starts > 0 with --shots)")
    hist_sim, low_sim = [], []
    for b in boundaries:
        before, after = frames[max(0, b - window):b], frames[b:min(t, b + window)]
        hist_sim.append(1.0 - hellinger(color_histogram(before), color_histogram(after)))
        low_sim.append(1.0 - float(np.abs(_thumbnail(before) - _thumbnail(after)).mean()))
    stats = {"hist_similarity": float(np.mean(hist_sim)), "lowfreq_similarity": float(np.mean(low_sim)),
             "min_hist_similarity": float(np.min(hist_sim)), "num_switches": float(len(boundaries))}
    return MetricResult("shot_consistency", stats["hist_similarity"], stats, hist_sim, "shot switch")


# ---------------------------------------------------------------------------------------------------------
# Reference-based metrics (two runs of the same seed)
# ---------------------------------------------------------------------------------------------------------
def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"compared videos differ in shape: {a.shape} vs {b.shape} ([T, H, W, 3])")


def psnr(a: np.ndarray, b: np.ndarray) -> MetricResult:
    """PSNR in dB (peak 1.0 on [0, 1] frames). Headline from the whole video's MSE; inf when identical."""
    _check_pair(a, b)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))  # [T]
    per_frame = [math.inf if m == 0 else 10 * math.log10(1.0 / m) for m in mse]
    total = float(mse.mean())
    value = math.inf if total == 0 else 10 * math.log10(1.0 / total)
    return MetricResult("psnr", value, {"min": float(min(per_frame)), "mean_mse": total}, per_frame)


def _gaussian_kernel(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_frames(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5,
                k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM per frame of a, b [N, C, H, W]: Gaussian window (sigma 1.5, radius 5), population covariances,
    mean over the valid (unpadded) region and the channels -> [N]."""
    c = a.shape[1]
    g = _gaussian_kernel(sigma).to(a.dtype)
    gy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    gx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, gy, groups=c), gx, groups=c)

    if min(a.shape[-2:]) < g.numel():
        raise ValueError(f"SSIM needs frames of at least {g.numel()}x{g.numel()} pixels, got {tuple(a.shape[-2:])}")
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray, batch: int = 16) -> MetricResult:
    """Mean SSIM over frames (RGB, channel-averaged); 1 when identical."""
    _check_pair(a, b)
    per_frame: list[float] = []
    for i in range(0, a.shape[0], batch):
        ta = torch.from_numpy(np.ascontiguousarray(a[i:i + batch])).double().permute(0, 3, 1, 2)
        tb = torch.from_numpy(np.ascontiguousarray(b[i:i + batch])).double().permute(0, 3, 1, 2)
        per_frame += ssim_frames(ta, tb).tolist()
    return MetricResult("ssim", float(np.mean(per_frame)), {"min": float(np.min(per_frame))}, per_frame)


def latent_error(a: torch.Tensor, b: torch.Tensor) -> MetricResult:
    """MSE per latent frame between runs a and reference b ([T, C, h, w]); stats: relative error."""
    if a.shape != b.shape:
        raise ValueError(f"compared latents differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} ([T, C, h, w])")
    d = (a.double() - b.double()) ** 2
    per_frame = d.flatten(1).mean(1)
    rel = float(d.sum() / (b.double() ** 2).sum().clamp_min(1e-30))
    stats = {"max_frame_mse": float(per_frame.max()), "rel_sq_error": rel}
    return MetricResult("latent_mse", float(d.mean()), stats, per_frame.tolist(), "latent frame")


def lpips_status(net: str = "alex") -> str | None:
    """None when LPIPS can run offline, else the reason it cannot."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the `lpips` package is not installed (pip install lpips)"
    ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    prefix = {"alex": "alexnet-", "vgg": "vgg16-", "squeeze": "squeezenet1_1-"}[net]
    if not (os.path.isdir(ckpt_dir) and any(f.startswith(prefix) for f in os.listdir(ckpt_dir))):
        return f"LPIPS backbone weights ({prefix}*.pth) are not in {ckpt_dir}; they are never downloaded here"
    return None


def lpips(a: np.ndarray, b: np.ndarray, net: str = "alex", batch: int = 8) -> MetricResult:
    """LPIPS distance per frame (lower = closer) when the package and its weights are present locally."""
    _check_pair(a, b)
    reason = lpips_status(net)
    if reason:
        return MetricResult.skip("lpips", reason)
    import lpips as lp

    model = lp.LPIPS(net=net, verbose=False).eval()
    per_frame: list[float] = []
    with torch.no_grad():
        for i in range(0, a.shape[0], batch):
            ta = torch.from_numpy(np.ascontiguousarray(a[i:i + batch])).permute(0, 3, 1, 2) * 2 - 1
            tb = torch.from_numpy(np.ascontiguousarray(b[i:i + batch])).permute(0, 3, 1, 2) * 2 - 1
            per_frame += model(ta.float(), tb.float()).flatten().tolist()
    return MetricResult("lpips", float(np.mean(per_frame)), {"max": float(np.max(per_frame))}, per_frame)
