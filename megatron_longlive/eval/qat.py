"""Quantization-aware fine-tune of a checkpoint for the fidelity report (BF16 vs NVFP4 PTQ vs NVFP4 QAT).

A QAT run starts from the report's checkpoint, swaps its linears for the variant's `quant.linear` (e.g.
`nvfp4_emulated`: NVFP4 forward and both backward GEMMs, BF16/fp32 master weights) through `convert_linears`,
and trains it for `steps` optimizer steps with the project's Trainer (AdamW, `train.lr`, warm-up, clipping) on
the variant's training data (`data.*`). Its checkpoint (a normal run directory) is then generated with the same
quantized linears. PTQ, by contrast, quantizes the untouched checkpoint.

Two objectives:
  task     the training loss of `longlive train` (teacher-forcing flow matching on the data): QAT as in
           training; the fine-tune also moves the model towards the data, which a BF16 reference does not see.
  distill  the high-precision checkpoint's own prediction on the same teacher-forcing inputs (noise, sigmas):
           MSE(quantized student, frozen BF16 teacher). Only quantization error is trained away.
A variant with `quant.linear=bf16` runs the same fine-tune without quantization: a control row that shows how
far the fine-tune alone moves the output.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

import torch
from torch import nn

from ..config import RunConfig
from ..training.teacher_forcing import (build_tf_inputs, flow_matching_loss, noisy_prediction, tf_forward,
                                        tf_text_context)

QATLoss = Literal["task", "distill"]
QAT_LOSSES = ("task", "distill")


@dataclasses.dataclass(frozen=True)
class QATSettings:
    steps: int
    loss: QATLoss = "task"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"qat.steps={self.steps!r}: must be an integer >= 1, e.g. qat.steps=20")
        if self.loss not in QAT_LOSSES:
            raise ValueError(f"qat.loss={self.loss!r}: use one of {', '.join(QAT_LOSSES)}")


@dataclasses.dataclass
class SelfDistillStep:
    """Trainer StepStrategy: the student's noisy-half prediction regressed on the frozen teacher's, both on the
    same teacher-forcing inputs (same latents, noise and per-chunk sigmas; each model embeds them itself)."""

    teacher: nn.Module
    chunk_frames: int
    shift: float = 5.0
    num_train_timesteps: int = 1000
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None

    def __call__(self, model, batch, generator):
        from ..training.schedule import sample_sigmas

        latents = batch["latents"].to(self.device)                          # [B, C, F, H, W]
        text = batch["text"].to(self.device)
        b, f = latents.shape[0], latents.shape[2]
        sigma = sample_sigmas((b, f // self.chunk_frames), self.shift, self.num_train_timesteps, generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        sigma = sigma.to(latents.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            with torch.no_grad():
                t_in = build_tf_inputs(self.teacher, latents, noise, sigma, self.chunk_frames,
                                       self.num_train_timesteps)
                target = noisy_prediction(self.teacher, tf_forward(
                    self.teacher, t_in, tf_text_context(self.teacher, text, None, self.chunk_frames)), t_in)
            s_in = build_tf_inputs(model, latents, noise, sigma, self.chunk_frames, self.num_train_timesteps)
            pred = noisy_prediction(model, tf_forward(model, s_in, tf_text_context(model, text, None,
                                                                                    self.chunk_frames)), s_in)
            loss = flow_matching_loss(pred.float(), target.float(), s_in.loss_weight)
        return loss, s_in.tokens.shape[0] * s_in.tokens.shape[1]


def qat_config(cfg: RunConfig, steps: int, out_dir: str) -> RunConfig:
    """The variant's config with the fine-tune's run settings: `steps` steps, one checkpoint at the end in
    `out_dir`, no wandb; everything else (lr, data, quant, seed ...) as the variant says."""
    if cfg.train.lora_rank > 0:
        raise ValueError(f"QAT fine-tunes all weights but train.lora_rank={cfg.train.lora_rank}. Fix: drop "
                         "train.lora_rank from the QAT variant")
    train = dataclasses.replace(cfg.train, max_steps=steps, output_dir=out_dir, save_interval=steps, keep_last=1,
                                wandb_mode="disabled", warmup_steps=min(cfg.train.warmup_steps, steps))
    return dataclasses.replace(cfg, train=train)


def qat_finetune(cfg: RunConfig, checkpoint: str, settings: QATSettings, out_dir: str,
                 device: str | torch.device = "cpu", progress: bool = True, datasets: dict | None = None) -> str:
    """Fine-tune `checkpoint` with the linears of `cfg.quant` for `settings.steps` steps; returns the run
    directory (its checkpoint loads with `inference.pipeline.load_dit`). Losses go to OUT_DIR/metrics.jsonl.
    datasets: a dict shared between calls so runs with the same data and model config build their data once."""
    from dataloaders.latent_dataset import build_dataset

    from ..inference.pipeline import load_dit
    from ..training.trainer import TeacherForcingStep, Trainer

    if not checkpoint:
        raise ValueError("a QAT variant fine-tunes a checkpoint: give --checkpoint (a run directory, step_* "
                         "directory or .safetensors file)")
    device = torch.device(device)
    tcfg = qat_config(cfg, settings.steps, out_dir)
    model = load_dit(tcfg, checkpoint, device).train()       # quant.linear applied by convert_linears
    for p in model.parameters():
        p.requires_grad_(True)
    autocast = torch.bfloat16 if (tcfg.train.precision == "bf16" and device.type == "cuda") else None
    tc = tcfg.train
    if settings.loss == "distill":
        high = dataclasses.replace(tcfg, quant=dataclasses.replace(tcfg.quant, linear="bf16"))
        teacher = load_dit(high, checkpoint, device).requires_grad_(False)
        strategy = SelfDistillStep(teacher, tc.chunk_frames, tc.timestep_shift, tc.num_train_timesteps, device,
                                   autocast)
    else:
        strategy = TeacherForcingStep(tc.chunk_frames, tc.timestep_shift, tc.num_train_timesteps, device, autocast)
    datasets = {} if datasets is None else datasets
    key = repr((tcfg.data, tcfg.model))
    if key not in datasets:
        datasets[key] = build_dataset(tcfg)
    trainer = Trainer(tcfg, dataset=datasets[key], device=device, strategy=strategy, model=model, progress=progress)
    # Stochastic rounding / RHT draws use the global RNG: seed it from train.seed (and restore it afterwards), so
    # a QAT run does not depend on what the variants before it consumed.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(tc.seed)
        trainer.train()
    if trainer.last_checkpoint is None or not os.path.isdir(trainer.last_checkpoint):
        raise RuntimeError(f"QAT fine-tune in {out_dir} wrote no checkpoint")
    return out_dir
