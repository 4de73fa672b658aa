"""Teacher-forcing trainer: one loop for single-process runs now and SP/TP/DP runs later.

Seams for parallelism (applied from outside, STYLE.md §1):
  * `StepStrategy` - model forward + loss for one micro-batch. `TeacherForcingStep` is the
    single-process one; Balanced SP supplies its own (sharded layout, all-to-all attention).
  * data sharding - `LatentLoader(rank, world_size)`; the trainer takes `dp_rank` / `dp_size`.
  * `ParallelHooks` - gradient sync before clipping, loss reduction for logging, which rank logs,
    and the checkpoint manager (a collective one for multi-rank runs).
The loop: AdamW, linear warm-up + cosine to `min_lr_ratio`, gradient accumulation and clipping,
bf16 autocast on CUDA (fp32 on CPU), optional activation checkpointing and LoRA, EMA, metrics.jsonl
+ wandb, tqdm, periodic / SIGTERM checkpoints, exact resume, and a clear stop on a NaN/Inf loss.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
import warnings
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from dataloaders.latent_dataset import LatentLoader, build_dataset, check_item, latent_shape
from ..config import RunConfig, to_plain
from ..models.provider import LinearProvider
from ..models.wan import WanDiT
from .checkpoint import CheckpointManager, local_state, restore_local_state, rng_state, set_rng_state
from .ema import EMA
from .error_recycling import ErrorRecycler, RecyclingOptions
from .lora import adapter_state_dict, apply_lora, lora_modules, save_adapter
from .metrics import MetricsLogger
from .offload import BlockInputOffload
from ..inference.kv_cache import CacheLayout
from ..inference.sinks import SinkRule
from .teacher_forcing import teacher_forcing_loss


class TrainingDiverged(ValueError):
    """The loss became NaN/Inf; carries the step and the last good checkpoint."""


class StepStrategy(Protocol):
    """Forward + loss of one micro-batch. Returns (loss to backpropagate, number of tokens processed)."""

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, int]: ...


@dataclasses.dataclass
class TeacherForcingStep:
    """Single-process teacher forcing: [clean | noisy] sequence, noisy-token velocity MSE.

    per_shot_text: use the batch's per-shot captions ('texts' [B, N, L, D], 'frame_shot' [B, F]) when present;
    a chunk takes the shot of its first latent frame. first_frame_prob / recycler: image-to-video conditioning
    and error recycling (`teacher_forcing_loss`); the defaults are plain teacher forcing.
    """

    chunk_frames: int
    shift: float = 5.0
    num_train_timesteps: int = 1000
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    per_shot_text: bool = True
    first_frame_prob: float = 0.0
    recycler: ErrorRecycler | None = None
    rule: SinkRule | None = None
    """Long tuning: the engine's sink/window rule for the mask (None: full causal history)."""

    def shot_starts(self, batch) -> tuple[int, ...]:
        """Shot start chunks of the batch (from frame_shot), which must be the same for every video."""
        if "frame_shot" not in batch:
            return (0,)
        chunk_shot = batch["frame_shot"][:, ::self.chunk_frames]                        # [B, n]
        starts = [tuple([0] + [c for c in range(1, row.numel()) if row[c] != row[c - 1]]) for row in chunk_shot]
        if len(set(starts)) > 1:
            raise ValueError(f"train.long_tuning: the videos of a micro-batch start shots at different chunks "
                             f"{sorted(set(starts))}; one mask serves the batch. Fix: set train.micro_batch=1")
        return starts[0]

    def __call__(self, model, batch, generator):
        latents = batch["latents"].to(self.device, non_blocking=True)
        text, chunk_text = batch["text"], None
        shot_starts = self.shot_starts(batch) if self.rule is not None else (0,)
        if self.per_shot_text and "texts" in batch:
            text, chunk_text = batch["texts"], batch["frame_shot"][:, ::self.chunk_frames]
        text = text.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss, inputs = teacher_forcing_loss(model, latents, text, self.chunk_frames, generator, self.shift,
                                                self.num_train_timesteps, chunk_text=chunk_text,
                                                first_frame_prob=self.first_frame_prob, recycler=self.recycler,
                                                rule=self.rule, shot_starts=shot_starts)
        return loss, inputs.tokens.shape[0] * inputs.tokens.shape[1]


@dataclasses.dataclass
class ParallelHooks:
    """What a multi-rank run changes in the loop; the defaults are the single-process behaviour.

    grad_sync(params): called once per optimizer step after accumulation, before clipping (e.g. all-reduce
    over SP/DP). reduce_loss(value) -> float: the logged loss across ranks. is_logger: this rank writes
    metrics.jsonl / wandb / the progress bar. checkpoint: a `CheckpointManager` (collective for SP/DP).
    """

    grad_sync: Callable[[list[torch.Tensor]], None] | None = None
    reduce_loss: Callable[[float], float] | None = None
    clip_grad_norm: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None
    """(params, max_norm) -> total norm before clipping, over all ranks (TP: shards summed); default torch's."""
    is_logger: bool = True
    checkpoint: CheckpointManager | None = None
    zero_grad: Callable[[], None] | None = None
    """Called at the start of every optimizer step, before the first backward (e.g. megatron DDP's grad buffers)."""
    any_rank: Callable[[bool], bool] | None = None
    """flag -> True if any rank's flag is True (a collective, once per step): every rank stops on the same step
    when SIGTERM reaches only some of them (Slurm signals each node's tasks at slightly different times)."""


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_activation_checkpointing(model: WanDiT, offload: BlockInputOffload | None = None) -> None:
    """Recompute each block's activations in backward (non-reentrant checkpoint), from outside the model.

    The block's forward is replaced on the instance, so parameter names and state dicts are unchanged.
    offload: keep each block's saved hidden-state input (its first argument) in host memory between the
    forward and the block's recompute (`train.offload_activations`, training/offload.py).
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def ckpt_forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            with offload.saving(args[0]) if offload is not None else contextlib.nullcontext():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = ckpt_forward


def apply_memory_options(model: WanDiT, tc, device: torch.device) -> BlockInputOffload | None:
    """`train.activation_checkpointing` and `train.offload_activations` on `model` (the trainer's and the
    distiller's one path), and `train.compile_elementwise` (process-wide); returns the offload (its byte
    counters) or None."""
    from ..models import compiled_ops

    mode = tc.compile_elementwise
    compiled_ops.enable(mode == "on" or (mode == "auto" and torch.device(device).type == "cuda"))
    offload = BlockInputOffload() if tc.offload_activations else None
    if tc.offload_activations and torch.device(device).type != "cuda":
        warnings.warn(f"train.offload_activations saves no memory on {torch.device(device).type}: the block inputs "
                      f"are already in host memory (they are still copied, bit for bit).", stacklevel=3)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model, offload)
    return offload


def long_tuning_rule(cfg: RunConfig) -> SinkRule | None:
    """train.long_tuning: the inference cache's sink/window rule (infer.* sizes, in chunks), else None."""
    if not cfg.train.long_tuning:
        return None
    if cfg.infer.chunk_frames != cfg.train.chunk_frames:
        raise ValueError(f"train.long_tuning trains the attention pattern of inference, but train.chunk_frames="
                         f"{cfg.train.chunk_frames} != infer.chunk_frames={cfg.infer.chunk_frames}. Fix: use the same "
                         f"chunk size for both")
    # the engine's own conversion (whole chunks checked there); token counts play no part in the rule
    return SinkRule.from_layout(CacheLayout.from_config(cfg.infer, tokens_per_frame=1))


def build_model(cfg: RunConfig, provider: LinearProvider | None = None, device="cpu") -> WanDiT:
    """WanDiT with Wan's init (seeded from train.seed), or weights from train.init_from.

    Linears come from `provider`, else from `quant.linear` (bf16, fp8, nvfp4_emulated, te_nvfp4 through
    `build_linear_provider`); with `quant.packed_base` the loaded base is frozen and packed to NVFP4 for LoRA."""
    from ..quant.fp8_ffn import fuse_for_training
    from ..quant.providers import build_linear_provider

    if cfg.quant.packed_base and cfg.train.lora_rank <= 0:
        raise ValueError("quant.packed_base=true freezes and packs the base weights, so only LoRA adapters can train. "
                         "Fix: set train.lora_rank > 0 (or quant.packed_base=false for a full fine-tune)")
    torch.manual_seed(cfg.train.seed)
    model = WanDiT(cfg.model, provider or build_linear_provider(cfg.quant))
    fuse_for_training(model, cfg.quant)
    model.init_weights()
    if cfg.train.init_from:
        from ..models.wan.convert import load_wan_weights

        if not os.path.exists(cfg.train.init_from):
            raise FileNotFoundError(f"train.init_from: {cfg.train.init_from!r} not found. Fix: give a Wan checkpoint "
                                    f"(official, diffusers or native; file or directory) or leave it empty.")
        # Strict: any missing / unexpected / mis-shaped key is an error listing the keys and the likely preset.
        load_wan_weights(model, cfg.train.init_from)
    if cfg.quant.packed_base:
        from ..quant.nvfp4.packed import pack_model

        for p in model.parameters():
            p.requires_grad_(False)
        pack_model(model, keep=cfg.quant.keep_high_precision, block_2d=cfg.quant.weight_2d)
    return model.to(device)


class Trainer:
    """Owns model, optimizer, scheduler, EMA, loader, metrics and checkpoints of one run."""

    def __init__(self, cfg: RunConfig, dataset=None, device: str | torch.device | None = None,
                 strategy: StepStrategy | None = None, model: nn.Module | None = None, resume: bool = False,
                 progress: bool = True, dp_rank: int = 0, dp_size: int = 1, hooks: ParallelHooks | None = None):
        tc = cfg.train
        self.hooks = hooks or ParallelHooks()
        self.cfg, self.tc, self.progress = cfg, tc, progress and self.hooks.is_logger
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        os.makedirs(tc.output_dir, exist_ok=True)
        if self.hooks.is_logger:
            with open(os.path.join(tc.output_dir, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
        # 1. data
        frames, _, _ = latent_shape(cfg)
        if frames % tc.chunk_frames:
            raise ValueError(f"train.chunk_frames={tc.chunk_frames} must divide the {frames} latent frames of "
                             f"data.num_frames={cfg.data.num_frames}. Fix: pick data.num_frames = 1 + 4 * k with "
                             f"1 + k a multiple of {tc.chunk_frames}, or change train.chunk_frames.")
        dataset = dataset if dataset is not None else build_dataset(cfg)
        check = functools.partial(check_item, dataset_name=dataset.name, cfg=cfg)
        check(dataset[0], 0)
        self.loader = LatentLoader(dataset, tc.micro_batch, frames, seed=cfg.data.seed, rank=dp_rank,
                                   world_size=dp_size, check=lambda item, i: check(item, i))
        # 2. model (+ LoRA, activation checkpointing), optimizer, schedule, EMA
        self.model = model if model is not None else build_model(cfg, device=self.device)
        self.model.train()
        if tc.lora_rank > 0 and not lora_modules(self.model):  # (TP runs get TP-aware adapters from the strategy)
            apply_lora(self.model, tc.lora_targets, tc.lora_rank, tc.lora_alpha)
        self.offload = apply_memory_options(self.model, tc, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_lambda, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps,
                                              min_lr_ratio=tc.min_lr_ratio))
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None
        autocast = torch.bfloat16 if (tc.precision == "bf16" and self.device.type == "cuda") else None
        if tc.precision == "bf16" and autocast is None:
            warnings.warn(f"train.precision=bf16 is ignored on {self.device.type}: training runs in float32 "
                          f"(bf16 autocast is used on CUDA only).", stacklevel=2)
        self.recycler = (ErrorRecycler(RecyclingOptions.from_train_config(tc), seed=tc.seed + 2)
                         if tc.error_recycling else None)
        self.strategy = strategy or TeacherForcingStep(tc.chunk_frames, tc.timestep_shift, tc.num_train_timesteps,
                                                       self.device, autocast, tc.per_shot_text, tc.first_frame_prob,
                                                       self.recycler, long_tuning_rule(cfg))
        self.generator = torch.Generator().manual_seed(tc.seed + 1)  # sigmas and noise
        # 3. checkpoints and resume
        self.ckpt = self.hooks.checkpoint or CheckpointManager(tc.output_dir, tc.keep_last, rank=dp_rank)
        self.step = 0
        self.last_checkpoint = None
        if resume:
            path = self.ckpt.latest()
            if path is not None:
                self._restore(path)
        self._stop_signal = None

    # ----- checkpoints ----------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "rng": rng_state(self.generator)}
        if self.recycler is not None:
            state["error_recycling"] = self.recycler.state_dict()
        return state

    def save_checkpoint(self) -> str:
        extra = None
        if self.tc.lora_rank > 0:
            tensors = adapter_state_dict(self.model)  # on every rank: gathers TP shards; one rank writes the files
            extra = lambda d: save_adapter(self.model, os.path.join(d, "adapter"), self.tc.lora_targets,  # noqa: E731
                                           tensors)
        self.last_checkpoint = self.ckpt.save(self.step, self.model, self.optimizer,
                                              self.ema.state_dict() if self.ema else None, self._trainer_state(), extra,
                                              local_state=local_state(self.model))
        return self.last_checkpoint

    def _restore(self, path: str) -> None:
        state = self.ckpt.load(path, self.model, self.optimizer, self.ema.state_dict() if self.ema else None)
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"], self.generator)
        if self.recycler is not None and "error_recycling" in state:
            self.recycler.load_state_dict(state["error_recycling"])
        restore_local_state(self.model, self.ckpt, path)
        self.last_checkpoint = path
        tqdm.write(f"resumed from {path} at step {self.step}")

    # ----- loop -----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics (raises on NaN/Inf)."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if self.hooks.zero_grad is not None:
            self.hooks.zero_grad()
        total, tokens, bad = 0.0, 0, []
        for _ in range(self.tc.grad_accum):
            batch = next(self.loader)
            loss, n_tok = self.strategy(self.model, batch, self.generator)
            value = loss.item()
            if math.isfinite(value):
                (loss / self.tc.grad_accum).backward()
            else:
                bad.append(batch["index"])
            total += value / self.tc.grad_accum
            tokens += n_tok
        if self.hooks.reduce_loss is not None:  # collective: every rank sees a NaN anywhere
            total = self.hooks.reduce_loss(total)
        if not math.isfinite(total):
            kept = self.last_checkpoint or "none (no checkpoint was written yet)"
            where = f" (videos {bad[0]})" if bad else " (on another rank)"
            raise TrainingDiverged(
                f"step {self.step + 1}: loss is {total}{where}; training stopped before applying this step. "
                f"Last good checkpoint: {kept}. Fix: lower train.lr, check the data, or resume with --resume.")
        if self.hooks.grad_sync is not None:
            self.hooks.grad_sync(self.params)
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        grad_norm = (self.hooks.clip_grad_norm or torch.nn.utils.clip_grad_norm_)(self.params, clip).item()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                "step_time": dt}

    def _on_sigterm(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> list[float]:
        """Run to train.max_steps; returns this call's losses. Saves periodically, at the end and on SIGTERM."""
        tc = self.tc
        logger = MetricsLogger(tc.output_dir, tc.wandb_mode, to_plain(self.cfg), resume_step=self.step,
                               enabled=self.hooks.is_logger)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        losses: list[float] = []
        start = time.time()
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while self.step < tc.max_steps:
                m = self.train_step()
                m["time"] = time.time() - start
                losses.append(m["loss"])
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    logger.log(m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                saved = self.step % tc.save_interval == 0 or self.step == tc.max_steps
                if saved:
                    self.save_checkpoint()
                stop = self._stop_signal is not None
                if self.hooks.any_rank is not None:
                    stop = self.hooks.any_rank(stop)
                if stop:
                    path = self.last_checkpoint if saved else self.save_checkpoint()
                    tqdm.write(f"SIGTERM: saved {path} at step {self.step}; stopping")
                    break
        finally:
            bar.close()
            logger.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return losses


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
