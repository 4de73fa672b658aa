"""Generate the runs a fidelity report compares: one model, one prompt schedule, several config variants.

A variant is a label plus `--set`-style overrides applied on top of the base config, e.g.
`bf16` (none), `steps2` (`infer.denoising_steps=[1000,500]`), `nvfp4_kv` (`quant.kv_cache=nvfp4`),
`nvfp4_ptq` (`quant.linear=nvfp4_emulated`: the checkpoint quantized after training), and
`nvfp4_qat` (`quant.linear=nvfp4_emulated qat.steps=20`): `qat.*` entries are not config keys but ask for a
quantization-aware fine-tune of the checkpoint with the variant's config before generating (eval/qat.py;
`qat.steps` optimizer steps, `qat.loss` task | distill).
Every variant is generated from the same checkpoint (or its QAT fine-tune) and the same noise seed
(`infer.seed`), through the streaming pipeline (`inference.pipeline.generate_video`), and written to
OUT/runs/<label>.mp4 / .pt; QAT runs are training runs in OUT/qat/<label>/.
The first variant is the reference. The float video (before mp4 encoding) is what gets compared, so codec
error does not enter the fidelity numbers.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from .fidelity import Run
from .qat import QATSettings

LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_QAT_STEPS = 20
QAT_KEYS = ("qat.steps", "qat.loss")


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...] = ()
    qat: QATSettings | None = None
    """Fine-tune the checkpoint with this variant's config before generating (None: generate it as is)."""


def parse_variant(items: list[str]) -> Variant:
    """["steps2", "infer.denoising_steps=[1000,500]", ...] -> Variant (from `--variant LABEL [KEY=VALUE ...]`)."""
    label, *overrides = items
    if not LABEL.match(label) or "=" in label:
        raise ValueError(f"--variant {' '.join(items)}: the first word is the run's label (letters, digits, _ . -), "
                         f"then section.key=value overrides, e.g. --variant steps2 infer.denoising_steps=[1000,500]")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {label}: {bad} are not section.key=value overrides")
    qat = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith("qat.")}
    unknown = sorted(set(qat) - set(QAT_KEYS))
    if unknown:
        raise ValueError(f"--variant {label}: unknown {unknown}; the QAT settings are {', '.join(QAT_KEYS)} "
                         f"(e.g. qat.steps=20 qat.loss=distill)")
    settings = None
    if qat:
        steps = qat.get("qat.steps", str(DEFAULT_QAT_STEPS))
        if not steps.isdigit():
            raise ValueError(f"--variant {label}: qat.steps={steps!r} must be a whole number of steps, "
                             "e.g. qat.steps=20")
        settings = QATSettings(int(steps), qat.get("qat.loss", "task"))
    return Variant(label, tuple(o for o in overrides if not o.startswith("qat.")), settings)


def _frames(video: torch.Tensor) -> "torch.Tensor":
    """[1, 3, T, H, W] in [-1, 1] -> numpy [T, H, W, 3] in [0, 1] (float32)."""
    return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).contiguous().numpy()


def generate_variants(variants: list[Variant], segments, out_dir: str, config: str | None = None,
                      overrides: list[str] | None = None, checkpoint: str | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      progress: bool = True) -> list[Run]:
    """Generate one video per variant (config = base `config` + `overrides` + the variant's overrides)."""
    from ..config import load_config
    from ..inference.pipeline import generate_video, load_dit, resolve_checkpoint

    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--variant labels must be distinct, got {labels}")
    if checkpoint:
        resolve_checkpoint(checkpoint)  # a missing / incomplete checkpoint fails before any work
    qat = [v.label for v in variants if v.qat]
    if qat and not checkpoint:
        raise ValueError(f"--variant {qat[0]}: a QAT variant fine-tunes the report's checkpoint; give --checkpoint "
                         "(a run directory, step_* directory or .safetensors file)")
    configs = [load_config(config, list(overrides or []) + list(v.overrides)) for v in variants]  # all valid first
    runs_dir = os.path.join(out_dir, "runs")
    runs: list[Run] = []
    datasets: dict = {}  # QAT training data, built (e.g. VAE-encoded) once per data config
    for v, cfg in zip(variants, configs):
        weights = checkpoint
        if v.qat:
            from .qat import qat_finetune

            weights = qat_finetune(cfg, checkpoint, v.qat, os.path.join(out_dir, "qat", v.label), device, progress,
                                   datasets)
        model = load_dit(cfg, weights, device, dtype)
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


def qat_notes(variants: list[Variant], out_dir: str) -> list[str]:
    """One line per QAT variant: what it trained (from its run's config.yaml), objective, steps, first and last
    training loss, and where its run is."""
    import json

    from ..config import load_config

    notes = []
    for v in variants:
        if not v.qat:
            continue
        run = os.path.join(out_dir, "qat", v.label)
        linear = load_config(os.path.join(run, "config.yaml")).quant.linear
        with open(os.path.join(run, "metrics.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f if line.strip()]
        what = (f"QAT with quant.linear={linear}" if linear != "bf16"
                else "fine-tuning control without quantization (quant.linear=bf16)")
        notes.append(f"variant {v.label!r}: {what}, {v.qat.loss} loss, {v.qat.steps} steps from the checkpoint "
                     f"(loss {losses[0]:.5g} -> {losses[-1]:.5g}); run in {run}")
    return notes
