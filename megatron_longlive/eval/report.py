"""Per-video and aggregate evaluation -> `report.json`, `report.md` (readable tables) and PNG plots over time.

`evaluate_video` runs the requested metrics on one video (frames and/or latents); `Report` collects the
results of many videos (plus an optional fidelity table from `fidelity.compare_runs`) and writes them.
Infinite values (PSNR of identical runs) are written as the string "inf" in JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys

import numpy as np
import torch

from . import features, metrics
from .metrics import MetricResult

WEIGHT_FREE = ("flicker", "drift", "motion", "sharpness", "exposure", "shot_consistency", "latent_drift")
FEATURE_BASED = ("subject_consistency", "background_consistency", "text_video_similarity")
ALL_METRICS = WEIGHT_FREE + FEATURE_BASED
UNITS = {"flicker": "mean abs Δ, 0-255", "drift": "hist. Hellinger", "motion": "px/frame", "sharpness": "Lap. var",
         "exposure": "mean luma", "shot_consistency": "hist. sim.", "latent_drift": "rel. dist.",
         "subject_consistency": "DINO cos", "background_consistency": "CLIP cos", "text_video_similarity": "CLIP cos",
         "psnr": "dB", "ssim": "", "lpips": "", "latent_mse": ""}


@dataclasses.dataclass
class EvalOptions:
    """What to compute and with which local weights."""

    metrics: tuple[str, ...] = WEIGHT_FREE
    window: int | None = None
    """Early/late window in frames (default 10% of the video)."""
    sink_frames: int = 1
    """Latent frames forming the first shot's sink (latent_drift)."""
    motion_stride: int = 1
    dino: str | None = None
    clip: str | None = None
    prompts: list[str] | None = None
    vbench: tuple[str, ...] = ()
    vbench_long: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")


def evaluate_video(frames: np.ndarray | None, latents: torch.Tensor | None = None, shots: list[int] | None = None,
                   options: EvalOptions | None = None, video_path: str | None = None) -> list[MetricResult]:
    """Metrics of one video. frames: [T, H, W, 3] uint8 or float in [0, 1]; latents: [T, C, h, w]."""
    opt = options or EvalOptions()
    want = set(opt.metrics)
    out: list[MetricResult] = []
    f = None
    if frames is not None:
        f = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames
        u8 = frames if frames.dtype == np.uint8 else np.clip(frames * 255 + 0.5, 0, 255).astype(np.uint8)
    pixel = [m for m in ("flicker", "drift", "motion", "sharpness", "exposure", "shot_consistency") if m in want]
    if f is None:
        out += [MetricResult.skip(m, "no decoded video given (latents only)") for m in pixel]
    else:
        if "flicker" in want:
            out.append(metrics.flicker(f, shots))
        if "drift" in want:
            out.append(metrics.drift(f, opt.window, shot_starts=shots))
        if "motion" in want:
            out.append(metrics.motion(f, opt.motion_stride, progress=opt.progress, shot_starts=shots))
        if "sharpness" in want:
            out.append(metrics.sharpness(f))
        if "exposure" in want:
            out.append(metrics.exposure(f))
        if "shot_consistency" in want:
            out.append(metrics.shot_consistency(f, shots) if shots else
                       MetricResult.skip("shot_consistency", "no shot starts given (--shots)"))
    if "latent_drift" in want:
        out.append(metrics.latent_drift(latents, opt.sink_frames, opt.window) if latents is not None else
                   MetricResult.skip("latent_drift", "no latent dump given (--latents)"))
    feature_names = [m for m in FEATURE_BASED if m in want]
    if feature_names and f is None:
        out += [MetricResult.skip(m, "no decoded video given (latents only)") for m in feature_names]
    elif feature_names:
        if "subject_consistency" in want:
            out.append(features.subject_consistency(u8, opt.dino))
        if "background_consistency" in want or "text_video_similarity" in want:
            out += [r for r in features.clip_metrics(u8, opt.clip, opt.prompts, shots) if r.name in want]
    if opt.vbench:
        if video_path is None or f is None:
            out += [MetricResult.skip(f"vbench/{d}", "VBench needs a video file") for d in opt.vbench]
        else:
            out += features.vbench_metrics(video_path, list(opt.vbench), opt.vbench_long)
    return out


# ---------------------------------------------------------------------------------------------------------
# Collecting and writing
# ---------------------------------------------------------------------------------------------------------
def _json_num(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _json_num(obj)


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 0.99 < abs(x) < 1:  # SSIM-like values: keep the digits that tell runs apart
        return f"{x:.6f}"
    return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.3e}"


def aggregate(per_video: dict[str, list[MetricResult]]) -> dict[str, dict[str, float]]:
    """Mean / min / max of each metric's headline value over the videos where it was computed."""
    values: dict[str, list[float]] = {}
    for results in per_video.values():
        for r in results:
            if r.value is not None:
                values.setdefault(r.name, []).append(r.value)
    return {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)), "videos": len(v)}
            for k, v in values.items()}


@dataclasses.dataclass
class Report:
    """Everything one `longlive eval` command produced."""

    per_video: dict[str, list[MetricResult]] = dataclasses.field(default_factory=dict)
    sources: dict[str, dict[str, str | None]] = dataclasses.field(default_factory=dict)
    fidelity: list[dict] | None = None
    """Rows from `fidelity.compare_runs` (one per compared run)."""
    fidelity_results: dict[str, list[MetricResult]] = dataclasses.field(default_factory=dict)
    reference: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    """Caveats shown under the fidelity table (e.g. a variant that reproduced the reference exactly)."""
    command: str = dataclasses.field(default_factory=lambda: " ".join(shlex.quote(a) for a in
                                                                      ["longlive", *sys.argv[1:]]))

    def add_video(self, label: str, results: list[MetricResult], **sources: str | None) -> None:
        if label in self.per_video:
            raise ValueError(f"two inputs share the label {label!r}; give distinct --labels")
        self.per_video[label] = results
        self.sources[label] = sources

    def skipped(self) -> list[tuple[str, str, str]]:
        """(video, metric, reason) of every metric that was not computed."""
        rows = [(label, r.name, r.skipped) for label, rs in self.per_video.items() for r in rs if r.skipped]
        rows += [(label, r.name, r.skipped) for label, rs in self.fidelity_results.items() for r in rs if r.skipped]
        return rows

    def skipped_grouped(self) -> list[tuple[str, str, list[str]]]:
        """(metric, reason, videos): one entry per distinct reason."""
        groups: dict[tuple[str, str], list[str]] = {}
        for video, metric, why in self.skipped():
            groups.setdefault((metric, why), []).append(video)
        return [(m, why, videos) for (m, why), videos in groups.items()]

    def to_json(self) -> dict:
        def res(r: MetricResult) -> dict:
            return dataclasses.asdict(r)
        return _jsonable({
            "command": self.command,
            "videos": {label: {"sources": self.sources.get(label, {}), "metrics": {r.name: res(r) for r in rs}}
                       for label, rs in self.per_video.items()},
            "aggregate": aggregate(self.per_video),
            "reference": self.reference,
            "fidelity": self.fidelity,
            "notes": self.notes,
            "fidelity_details": {label: {r.name: res(r) for r in rs} for label, rs in self.fidelity_results.items()},
            "skipped": [{"video": v, "metric": m, "reason": why} for v, m, why in self.skipped()],
        })

    def to_markdown(self) -> str:
        lines = ["# Evaluation report", "", "Command:", "", "```", self.command, "```", ""]
        if self.fidelity:
            lines += fidelity_markdown(self.fidelity, self.reference), ""
        if self.notes:
            lines += ["**Notes**", ""] + [f"- {n}" for n in self.notes] + [""]
        names = [n for n in ALL_METRICS + tuple(sorted({r.name for rs in self.per_video.values() for r in rs}
                                                       - set(ALL_METRICS)))
                 if any(r.name == n and r.value is not None for rs in self.per_video.values() for r in rs)]
        if names:
            lines += ["## Per-video metrics", "",
                      "| video | frames | " + " | ".join(f"{n} ({UNITS[n]})" if UNITS.get(n) else n for n in names)
                      + " |", "|---|---:|" + "---:|" * len(names)]
            for label, rs in self.per_video.items():
                by = {r.name: r for r in rs}
                frames = self.sources.get(label, {}).get("frames") or "—"
                lines.append(f"| {label} | {frames} | " + " | ".join(fmt(by[n].value) if n in by else "—"
                                                                     for n in names) + " |")
            agg = aggregate(self.per_video)
            if len(self.per_video) > 1:
                lines.append("| **mean** | | " + " | ".join(fmt(agg[n]["mean"]) if n in agg else "—"
                                                           for n in names) + " |")
            lines += ["", "## Details", ""]
            for n in names:
                keys = sorted({k for rs in self.per_video.values() for r in rs if r.name == n for k in r.stats})
                if not keys:
                    continue
                lines += [f"**{n}**", "", "| video | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
                for label, rs in self.per_video.items():
                    for r in rs:
                        if r.name == n and r.value is not None:
                            lines.append(f"| {label} | " + " | ".join(fmt(r.stats.get(k)) for k in keys) + " |")
                lines.append("")
        skipped = self.skipped_grouped()
        if skipped:
            lines += ["## Skipped", "", "| metric | reason | videos |", "|---|---|---|"]
            lines += [f"| {m} | {why} | {', '.join(videos)} |" for m, why, videos in skipped]
            lines.append("")
        return "\n".join(lines)

    def plot(self, out_dir: str, min_points: int = 8) -> list[str]:
        """One PNG per metric whose series has at least `min_points` points, one line per video/run."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series: dict[str, list[tuple[str, MetricResult]]] = {}
        for label, rs in list(self.per_video.items()) + [(f"{k} vs {self.reference}", v)
                                                          for k, v in self.fidelity_results.items()]:
            for r in rs:
                if r.series is not None and len(r.series) >= min_points:
                    series.setdefault(r.name, []).append((label, r))
        paths = []
        for name, items in series.items():
            fig, ax = plt.subplots(figsize=(7, 3.2))
            for label, r in items:
                y = np.array([v if math.isfinite(v) else np.nan for v in r.series], dtype=float)
                ax.plot(np.arange(len(y)), y, label=label, linewidth=1.2)
            ax.set_xlabel(items[0][1].series_axis)
            ax.set_ylabel(f"{name} ({UNITS[name]})" if UNITS.get(name) else name)
            ax.set_title(f"{name} over time")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{name.replace('/', '_')}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        return paths

    def write(self, out_dir: str, plots: bool = True, min_points: int = 8) -> dict[str, str | list[str]]:
        os.makedirs(out_dir, exist_ok=True)
        paths: dict[str, str | list[str]] = {"json": os.path.join(out_dir, "report.json"),
                                             "markdown": os.path.join(out_dir, "report.md")}
        with open(paths["json"], "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        with open(paths["markdown"], "w") as f:
            f.write(self.to_markdown() + "\n")
        paths["plots"] = self.plot(out_dir, min_points) if plots else []
        return paths


def fidelity_markdown(rows: list[dict], reference: str | None) -> str:
    """The one table of a fidelity comparison: a row per compared run, columns per metric."""
    cols = [c for c in ("psnr", "psnr_min", "ssim", "ssim_min", "lpips", "latent_mse", "latent_rel_sq_error")
            if any(row.get(c) is not None for row in rows)]
    head = f"## Fidelity vs reference `{reference}`\n\n| run | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols)
    body = [f"| {row['run']} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    if reference is not None:  # the reference's own row: every other row is measured against it
        body.insert(0, f"| {reference} (reference) | " + " | ".join("-" for _ in cols) + " |")
    return "\n".join([head, *body])
