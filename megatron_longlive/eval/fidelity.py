"""Fidelity of a run against a reference run of the same seed: BF16 vs NVFP4 (QAT / PTQ), BF16 vs NVFP4 KV
cache, 4 vs 2 sampling steps. Per frame PSNR / SSIM (/ LPIPS when local) on decoded videos and MSE on
latent dumps, aggregated into one table row per compared run.

Runs must match the reference in frame count and resolution (latent shape for latents); a mismatch is
an error naming both files, since a shifted or resized comparison would produce meaningless numbers.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from . import metrics
from .metrics import MetricResult
from .video_io import read_latents, read_video, to_float


@dataclasses.dataclass
class Run:
    """One generated video: decoded frames [T, H, W, 3] in [0, 1] and/or latents [T, C, h, w]."""

    label: str
    frames: np.ndarray | None = None
    latents: torch.Tensor | None = None
    video_path: str | None = None
    latent_path: str | None = None

    @property
    def name(self) -> str:
        return self.video_path or self.latent_path or self.label


def load_run(label: str, video: str | None = None, latents: str | None = None, layout: str = "CTHW") -> Run:
    if video is None and latents is None:
        raise ValueError(f"run {label!r}: give a video file, a latent dump, or both")
    return Run(label, to_float(read_video(video)) if video else None,
               read_latents(latents, layout) if latents else None,
               os.fspath(video) if video else None, os.fspath(latents) if latents else None)


def check_compatible(ref: Run, run: Run) -> None:
    """Same frame count and resolution (videos) / same latent shape; the error names both files."""
    if ref.frames is not None and run.frames is not None:
        (ta, ha, wa), (tb, hb, wb) = run.frames.shape[:3], ref.frames.shape[:3]
        if ta != tb:
            raise ValueError(f"{run.video_path} has {ta} frames but the reference {ref.video_path} has {tb}. Fix: "
                             "compare runs generated with the same number of chunks (infer.num_chunks)")
        if (ha, wa) != (hb, wb):
            raise ValueError(f"{run.video_path} is {wa}x{ha} but the reference {ref.video_path} is {wb}x{hb}. Fix: "
                             "compare runs generated at the same infer.height/width")
    if ref.latents is not None and run.latents is not None and ref.latents.shape != run.latents.shape:
        raise ValueError(f"{run.latent_path} has latents {tuple(run.latents.shape)} ([T, C, h, w]) but the reference "
                         f"{ref.latent_path} has {tuple(ref.latents.shape)}. Fix: compare runs of the same model, "
                         "resolution and length")


def compare(ref: Run, run: Run, use_lpips: bool = True) -> list[MetricResult]:
    """Reference-based metrics of `run` against `ref` (whatever both provide)."""
    check_compatible(ref, run)
    out: list[MetricResult] = []
    if ref.frames is not None and run.frames is not None:
        out += [metrics.psnr(run.frames, ref.frames), metrics.ssim(run.frames, ref.frames)]
        if use_lpips:
            out.append(metrics.lpips(run.frames, ref.frames))
    elif ref.frames is not None or run.frames is not None:
        out.append(MetricResult.skip("psnr", "only one of the two runs has a decoded video"))
    if ref.latents is not None and run.latents is not None:
        out.append(metrics.latent_error(run.latents, ref.latents))
    return out


def table_row(label: str, results: list[MetricResult]) -> dict:
    """Flatten one comparison into the columns of the fidelity table."""
    by = {r.name: r for r in results if r.value is not None}
    row: dict = {"run": label}
    if "psnr" in by:
        row.update(psnr=by["psnr"].value, psnr_min=by["psnr"].stats["min"])
    if "ssim" in by:
        row.update(ssim=by["ssim"].value, ssim_min=by["ssim"].stats["min"])
    if "lpips" in by:
        row["lpips"] = by["lpips"].value
    if "latent_mse" in by:
        row.update(latent_mse=by["latent_mse"].value, latent_rel_sq_error=by["latent_mse"].stats["rel_sq_error"])
    return row


def compare_runs(ref: Run, runs: list[Run], use_lpips: bool = True
                 ) -> tuple[list[dict], dict[str, list[MetricResult]]]:
    """One table (a row per run) plus the full per-frame results keyed by run label."""
    details = {run.label: compare(ref, run, use_lpips) for run in runs}
    return [table_row(label, rs) for label, rs in details.items()], details
