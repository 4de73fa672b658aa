"""Generate the runs a fidelity report compares: one model, one prompt schedule, several config variants.

A variant is a label plus `--set`-style overrides applied on top of the base config, e.g.
`bf16` (none), `steps2` (`infer.denoising_steps=[1000,500]`), `nvfp4_kv` (`quant.kv_cache=nvfp4`).
Every variant is generated from the same checkpoint and the same noise seed (`infer.seed`), through the
streaming pipeline (`inference.pipeline.generate_video`), and written to OUT/runs/<label>.mp4 / .pt.
The first variant is the reference. The float video (before mp4 encoding) is what gets compared, so codec
error does not enter the fidelity numbers.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from .fidelity import Run

LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...] = ()


def parse_variant(items: list[str]) -> Variant:
    """["steps2", "infer.denoising_steps=[1000,500]", ...] -> Variant (from `--variant LABEL [KEY=VALUE ...]`)."""
    label, *overrides = items
    if not LABEL.match(label) or "=" in label:
        raise ValueError(f"--variant {' '.join(items)}: the first word is the run's label (letters, digits, _ . -), "
                         f"then section.key=value overrides, e.g. --variant steps2 infer.denoising_steps=[1000,500]")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {label}: {bad} are not section.key=value overrides")
    return Variant(label, tuple(overrides))


def _frames(video: torch.Tensor) -> "torch.Tensor":
    """[1, 3, T, H, W] in [-1, 1] -> numpy [T, H, W, 3] in [0, 1] (float32)."""
    return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).contiguous().numpy()


def generate_variants(variants: list[Variant], segments, out_dir: str, config: str | None = None,
                      overrides: list[str] | None = None, checkpoint: str | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      progress: bool = True) -> list[Run]:
    """Generate one video per variant (config = base `config` + `overrides` + the variant's overrides)."""
    from ..config import load_config
    from ..inference.pipeline import generate_video, load_dit

    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--variant labels must be distinct, got {labels}")
    runs_dir = os.path.join(out_dir, "runs")
    runs: list[Run] = []
    for v in variants:
        cfg = load_config(config, list(overrides or []) + list(v.overrides))
        model = load_dit(cfg, checkpoint, device, dtype)
        video_path = os.path.join(runs_dir, f"{v.label}.mp4")
        latent_path = os.path.join(runs_dir, f"{v.label}.pt")
        result = generate_video(cfg, model, list(segments), video_path, latents_path=latent_path, progress=progress)
        latents = result.latents[0].permute(1, 0, 2, 3).float()  # [C, T, h, w] -> [T, C, h, w]
        runs.append(Run(v.label, _frames(result.video), latents, video_path, latent_path))
    return runs


def reproduced_reference(runs: list[Run], variants: list[Variant]) -> list[str]:
    """Notes for variants whose latents equal the reference's bit for bit: their overrides had no effect on the
    generator (e.g. a quant.* setting the pipeline does not apply), so their rows must not be read as fidelity."""
    ref, notes = runs[0], []
    for run, v in zip(runs[1:], variants[1:]):
        if run.latents.shape == ref.latents.shape and torch.equal(run.latents, ref.latents):
            notes.append(f"variant {run.label!r} produced exactly the reference's latents: its overrides "
                         f"{list(v.overrides)} were not used by the generator, so its row is not a fidelity "
                         "measurement")
    return notes
