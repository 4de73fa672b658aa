"""Few-step LoRA distillation by simplified DMD (DMD2 surrogate), on one frozen base (issue 11).

Three networks share one frozen base (optionally NVFP4-packed), switched by adapters (`lora_switch`):
  * generator = base + adapter "generator" (the only thing that is kept);
  * real score (teacher) = base with adapters off, classifier-free guidance `real_guidance`;
  * fake score (critic) = base + adapter "critic", trained `critic_ratio` times per generator step.

Generator rollout (`rollout`): self-generated chunk by chunk through the streaming engine's KV cache,
as at inference: for each chunk, the first k-1 denoising steps run without gradient (`engine.predict`),
the final step runs with gradient (same keys/values as the engine's hook, read from the cache without
writing it), and the clean chunk is committed to the cache without gradient. So gradients flow only
through the final denoising step of each chunk.

Scores of a whole rollout x at a re-noised x_t = (1 - s) x + s eps, s ~ shifted U[min, max]:
  * init=direct (base = teacher-forced AR checkpoint): the teacher-forcing layout, clean chunks = sg(x),
    noisy chunks = x_t, the mask the AR model was trained with;
  * init=standalone (base = bidirectional model): one full-attention forward of x_t.
Both predict the velocity v; x0 = x_t - s v. DMD gradient g = (x0_fake - x0_real) / mean|x - x0_real|,
generator loss 0.5 * ||x - sg(x - g)||^2 (its gradient wrt x is g). Critic loss: flow matching of the
critic on sg(x): ||v_critic(x_t) - (eps - x)||^2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..config import InferConfig, RunConfig, to_plain
from ..inference.engine import StreamingEngine
from ..models.wan.rope import grid_positions
from .checkpoint import CheckpointManager, local_state, restore_local_state, rng_state, set_rng_state
from .lora_switch import adapter_parameters, add_adapter, save_named_adapter, use_adapter
from .metrics import MetricsLogger
from .schedule import noise_latents, shift_sigma
from .teacher_forcing import build_tf_inputs, noisy_prediction, tf_forward
from .trainer import apply_memory_options

GENERATOR, CRITIC = "generator", "critic"
ScoreMode = Literal["causal", "bidirectional"]


# ----- rollout through the KV cache --------------------------------------------------------------------
class _ReadOnlyCache:
    """KV hook over a `KVCache` that reads the stored chunks and appends this chunk's (k, v) without writing
    the cache (in-place writes would break autograd). Same keys as the engine's hook; order does not matter."""

    def __init__(self, cache):
        self.cache = cache

    def hook(self, layer: int):
        # The context is read now, at forward time: activation checkpointing re-runs `fn` in backward, when
        # later chunks have been committed to the cache.
        slots = [s for s, c in enumerate(self.cache.slot_chunk) if c is not None]
        ks = [self.cache.k[layer, :, self.cache.layout.tokens(s)].clone() for s in slots]
        vs = [self.cache.v[layer, :, self.cache.layout.tokens(s)].clone() for s in slots]

        def fn(k, v, mask):
            return torch.cat(ks + [k], dim=1), torch.cat(vs + [v], dim=1), None
        return fn


def rollout_engine(model: nn.Module, chunk_frames: int, rollout_frames: int, steps: list[int], shift: float,
                   latent_hw: tuple[int, int], batch: int) -> StreamingEngine:
    """A streaming engine whose cache holds a whole rollout (global sink = first chunk, window = the rest)."""
    infer = InferConfig(denoising_steps=list(steps), timestep_shift=shift, chunk_frames=chunk_frames,
                        num_chunks=rollout_frames // chunk_frames, window_frames=max(rollout_frames, 2 * chunk_frames),
                        sink_frames=chunk_frames, shot_sink_frames=0)
    # guidance=False: the rollout is the student's own few-step sampler (CFG enters only the teacher's score)
    return StreamingEngine(model, infer, latent_hw, batch=batch, keep_latents=False, guidance=False)


def rollout(engine: StreamingEngine, text: torch.Tensor, noise: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Self-generate noise [B, C, F, H, W] chunk by chunk with the model's active adapter; returns x [B, C, F, H, W].

    grad=True: the last denoising step of every chunk is differentiable (earlier steps and cache writes are not)."""
    model, cf = engine.model, engine.latent_shape[1]
    engine.reset()
    engine.set_prompt(text)
    ctx = model.embed_context(text.to(engine.device, engine.dtype)) if grad else None
    sig = engine.sigmas
    out = []
    for c in range(noise.shape[2] // cf):
        x = noise[:, :, c * cf:(c + 1) * cf].to(engine.device, torch.float32)
        for s, s_next in zip(sig[:-2], sig[1:-1]):                # 1. all but the last step: no gradient
            x = x + (s_next - s) * engine.predict(x, s).float()
        s = sig[-2]
        if grad:                                                   # 2. the last step, differentiable
            tokens, _ = model.patchify(x.to(engine.dtype))
            t = torch.full((x.shape[0], engine.grid[0]), s * 1000.0, device=engine.device, dtype=torch.float32)
            pos = grid_positions(*engine.grid, frame_offset=engine.chunk_index * engine.grid[0], device=engine.device)
            v = model.unpatchify(model.forward_tokens(tokens, t, ctx, pos, kv_cache=_ReadOnlyCache(engine.cache)),
                                 engine.grid)
        else:
            v = engine.predict(x, s)
        x0 = x - s * v.float()                                     # Euler to sigma = 0
        engine.commit(x0.detach())                                 # 3. cache the clean chunk (no gradient)
        out.append(x0)
    return torch.cat(out, dim=2)


# ----- scores ------------------------------------------------------------------------------------------
def predict_x0(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
               mode: ScoreMode, chunk_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 prediction, velocity) of the model's active adapter at x_t = (1 - s) x + s eps. sigma: [B]."""
    b, f = x.shape[0], x.shape[2]
    x_t = noise_latents(x.detach(), noise, sigma.view(b, 1, 1, 1, 1))
    if mode == "causal":
        inputs = build_tf_inputs(model, x.detach(), noise, sigma[:, None].expand(b, f // chunk_frames), chunk_frames)
        v = noisy_prediction(model, tf_forward(model, inputs, model.embed_context(text)), inputs)
    else:
        v = model(x_t, sigma * 1000.0, text)
    return x_t - sigma.view(b, 1, 1, 1, 1) * v.float(), v.float()


def sample_sigma(batch: int, cfg, shift: float, generator: torch.Generator) -> torch.Tensor:
    """[B] noise levels: u ~ U[min_sigma_ratio, max_sigma_ratio], shifted like the training schedule."""
    u = cfg.min_sigma_ratio + (cfg.max_sigma_ratio - cfg.min_sigma_ratio) * torch.rand(batch, generator=generator,
                                                                                       dtype=torch.float64)
    return shift_sigma(u, shift).float()


def dmd_loss(model: nn.Module, x: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor, guidance: float, mode: ScoreMode, chunk_frames: int) -> tuple[torch.Tensor, dict]:
    """DMD2 surrogate 0.5 * ||x - sg(x - g)||^2 with g = (x0_fake - x0_real) / mean|x - x0_real| (per video)."""
    with torch.no_grad():
        with use_adapter(model, None):                              # real score: frozen teacher + CFG
            real, _ = predict_x0(model, x, noise, sigma, text, mode, chunk_frames)
            if guidance != 1.0:
                uncond, _ = predict_x0(model, x, noise, sigma, null_text, mode, chunk_frames)
                real = uncond + guidance * (real - uncond)
        with use_adapter(model, CRITIC):                            # fake score: the critic
            fake, _ = predict_x0(model, x, noise, sigma, text, mode, chunk_frames)
        norm = (x.float() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((fake - real) / norm)
    loss = 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach(), reduction="mean")
    return loss, {"dmd_grad_norm": grad.norm().item()}


def critic_loss(model: nn.Module, x: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                mode: ScoreMode, chunk_frames: int) -> torch.Tensor:
    """Flow-matching loss of the critic on the generator's (detached) samples."""
    with use_adapter(model, CRITIC):
        _, v = predict_x0(model, x.detach(), noise, sigma, text, mode, chunk_frames)
    return (v - (noise - x.detach()).float()).pow(2).mean()


# ----- the distiller -----------------------------------------------------------------------------------
class Distiller:
    """Owns the shared model (frozen base + generator/critic adapters), the two optimizers and the prompts."""

    def __init__(self, cfg: RunConfig, model: nn.Module, prompts: torch.Tensor, mode: ScoreMode,
                 latent_hw: tuple[int, int], device: torch.device | str = "cpu"):
        dc = cfg.distill
        self.cfg, self.dc, self.model, self.mode = cfg, dc, model, mode
        self.device = torch.device(device)
        self.chunk_frames = cfg.train.chunk_frames
        if dc.rollout_frames % self.chunk_frames:
            raise ValueError(f"distill.rollout_frames={dc.rollout_frames} must be a multiple of train.chunk_frames="
                             f"{self.chunk_frames}. Fix: e.g. distill.rollout_frames={4 * self.chunk_frames}.")
        self.prompts = prompts                                                      # [N, L, text_dim], any device
        self.null_text = torch.zeros_like(prompts[:1], device=self.device)          # [1, L, text_dim] unconditional
        adtype = torch.float32                                                      # adapters train in fp32
        init = torch.Generator().manual_seed(dc.seed + 1)                           # same adapters on any device
        add_adapter(model, GENERATOR, dc.targets, dc.rank, dc.alpha, adtype, init)
        add_adapter(model, CRITIC, dc.targets, dc.critic_rank, dc.critic_alpha, adtype, init)
        model.to(self.device)
        # train.activation_checkpointing / train.offload_activations, as the trainer applies them, on the one shared
        # model: the forwards with gradient (the rollout's last step per chunk, the critic's loss) are checkpointed;
        # the no-grad ones (earlier rollout steps, the DMD scores) run plain. Backward runs inside use_adapter.
        self.offload = apply_memory_options(model, cfg.train, self.device)
        self.gen_params, self.critic_params = adapter_parameters(model, GENERATOR), adapter_parameters(model, CRITIC)
        self.gen_opt = torch.optim.AdamW(self.gen_params, lr=dc.lr, betas=dc.betas, weight_decay=0.0)
        self.critic_opt = torch.optim.AdamW(self.critic_params, lr=dc.critic_lr, betas=dc.betas, weight_decay=0.0)
        self.engine = rollout_engine(model, self.chunk_frames, dc.rollout_frames, dc.denoising_steps,
                                     cfg.train.timestep_shift, latent_hw, dc.batch)
        self.latent = (cfg.model.in_channels, dc.rollout_frames, *latent_hw)
        self.gen = torch.Generator().manual_seed(dc.seed)
        self.step = 0
        # atomic checkpoints of what training changes: both adapters, both optimizers, step, RNG (not the base)
        self.ckpt = CheckpointManager(dc.output_dir, dc.keep_last, trainable_only=True)
        self.last_checkpoint: str | None = None

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text [B, L, D], rollout noise, sigma [B], re-noising noise) on the CPU generator, moved to the device."""
        b = self.dc.batch
        idx = torch.randint(0, self.prompts.shape[0], (b,), generator=self.gen)
        z = torch.randn((b, *self.latent), generator=self.gen)
        sigma = sample_sigma(b, self.dc, self.cfg.train.timestep_shift, self.gen)
        eps = torch.randn((b, *self.latent), generator=self.gen)
        d = self.device
        return self.prompts[idx].to(d), z.to(d), sigma.to(d), eps.to(d)

    def _update(self, loss: torch.Tensor, params: list, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.dc.grad_clip if self.dc.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        opt.step()
        return norm

    def critic_step(self) -> float:
        text, z, sigma, eps = self._draw()
        with torch.no_grad(), use_adapter(self.model, GENERATOR):
            x = rollout(self.engine, text, z, grad=False)
        # backward inside the adapter context: activation checkpointing recomputes blocks during backward
        with use_adapter(self.model, CRITIC):
            loss = critic_loss(self.model, x, text, sigma, eps, self.mode, self.chunk_frames)
            self._update(loss, self.critic_params, self.critic_opt)
        return loss.item()

    def generator_step(self) -> tuple[float, dict]:
        text, z, sigma, eps = self._draw()
        with use_adapter(self.model, GENERATOR):     # (the scores switch adapters inside and restore this one)
            x = rollout(self.engine, text, z, grad=True)
            loss, info = dmd_loss(self.model, x, text, self.null_text.expand_as(text), sigma, eps,
                                  self.dc.real_guidance, self.mode, self.chunk_frames)
            info["gen_grad_norm"] = self._update(loss, self.gen_params, self.gen_opt)
        return loss.item(), info

    def train_step(self) -> dict:
        """critic_ratio critic updates, then one generator update."""
        t0 = time.perf_counter()
        closs = [self.critic_step() for _ in range(self.dc.critic_ratio)]
        gloss, info = self.generator_step()
        self.step += 1
        return {"step": self.step, "critic_loss": sum(closs) / len(closs), "generator_loss": gloss, **info,
                "step_time": time.perf_counter() - t0}

    def save(self, directory: str | None = None) -> str:
        """Write generator/ and critic/ peft adapter directories under `directory` (default output_dir/step_N)."""
        directory = directory or os.path.join(self.dc.output_dir, f"step_{self.step:06d}")
        save_named_adapter(self.model, GENERATOR, os.path.join(directory, GENERATOR), self.dc.targets)
        save_named_adapter(self.model, CRITIC, os.path.join(directory, CRITIC), self.dc.targets)
        return directory

    def save_checkpoint(self) -> str:
        """Atomic resumable checkpoint under output_dir/checkpoints/step_N (see training/checkpoint.py)."""
        state = {"step": self.step, "rng": rng_state(self.gen)}
        self.last_checkpoint = self.ckpt.save(self.step, self.model, self.optimizers, None, state,
                                              local_state=local_state(self.model))
        return self.last_checkpoint

    def resume(self) -> str | None:
        """Restore adapters, optimizers, step and RNG from the newest complete checkpoint; None if there is none."""
        path = self.ckpt.latest()
        if path is None:
            return None
        state = self.ckpt.load(path, self.model, self.optimizers, None)
        self.step = int(state["step"])
        set_rng_state(state["rng"], self.gen)
        restore_local_state(self.model, self.ckpt, path)
        self.last_checkpoint = path
        tqdm.write(f"resumed distillation from {path} at step {self.step}")
        return path

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.gen_opt, self.critic_opt]

    def train(self, progress: bool = True) -> list[dict]:
        """Run to distill.max_steps from self.step; metrics.jsonl keeps the rows up to a resumed step, so it reads
        as one uninterrupted run. Saves adapters and a checkpoint every save_interval steps and at the end."""
        os.makedirs(self.dc.output_dir, exist_ok=True)
        with open(os.path.join(self.dc.output_dir, "config.yaml"), "w") as f:
            f.write(self.cfg.to_yaml())
        rows = []
        logger = MetricsLogger(self.dc.output_dir, self.cfg.train.wandb_mode, to_plain(self.cfg), resume_step=self.step)
        try:
            for _ in tqdm(range(self.step, self.dc.max_steps), desc="distill", unit="step", disable=not progress):
                m = self.train_step()
                rows.append(m)
                logger.log(m)
                if m["generator_loss"] != m["generator_loss"]:
                    raise ValueError(f"distill step {self.step}: generator loss is NaN. Fix: lower distill.lr.")
                if self.step % self.dc.save_interval == 0 or self.step == self.dc.max_steps:
                    self.save()
                    self.save_checkpoint()
        finally:
            logger.close()
        return rows


def build_distill(cfg: RunConfig, device: str | torch.device = "cpu", progress: bool = True,
                  resume: bool = False) -> Distiller:
    """Load the base named by distill.init (teacher or bidirectional base), prompts from the training data;
    resume=True continues from the newest complete checkpoint in distill.output_dir (fresh start if none)."""
    from dataloaders.latent_dataset import build_dataset, latent_shape

    dc = cfg.distill
    path = dc.teacher if dc.init == "direct" else dc.base
    field = "distill.teacher" if dc.init == "direct" else "distill.base"
    if not path:
        raise ValueError(f"{field} is empty but distill.init={dc.init!r} needs it. Fix: --set {field}=CHECKPOINT.")
    model = load_base(cfg, path)
    if cfg.quant.packed_base:
        from ..quant.nvfp4.packed import pack_model

        pack_model(model, keep=cfg.quant.keep_high_precision, block_2d=cfg.quant.weight_2d)
    ds = build_dataset(cfg)
    prompts = torch.stack([ds[i]["text"] for i in range(len(ds))]).float()
    _, h, w = latent_shape(cfg)
    mode: ScoreMode = "causal" if dc.init == "direct" else "bidirectional"
    distiller = Distiller(cfg, model, prompts, mode, (h, w), device)
    if resume:
        distiller.resume()
    return distiller


def load_base(cfg: RunConfig, path: str) -> nn.Module:
    """A WanDiT of cfg.model from a training run / step dir (DCP) or a Wan checkpoint file/dir (any format)."""
    from ..inference.pipeline import load_dit, resolve_checkpoint
    from ..models.wan import WanDiT
    from ..models.wan.convert import load_wan_weights

    if os.path.isdir(path) and (os.path.exists(os.path.join(path, "COMPLETE"))
                                or os.path.isdir(os.path.join(path, "checkpoints")) or
                                os.path.exists(os.path.join(path, "latest"))):
        return load_dit(cfg, resolve_checkpoint(path)).train()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: base checkpoint not found. Fix: give a run dir, step dir or Wan checkpoint.")
    model = WanDiT(cfg.model)
    load_wan_weights(model, path)   # strict: another config's checkpoint is an error naming the likely preset
    return model


@dataclasses.dataclass
class BidirectionalStep:
    """Trainer `StepStrategy` of the bidirectional base model: one sigma per video, full attention, velocity MSE.

    (The standalone-injection route distils from such a base; tests train a tiny one with it.)"""

    shift: float = 5.0
    device: torch.device = torch.device("cpu")

    def __call__(self, model, batch, generator):
        from .schedule import sample_sigmas, velocity_target

        x = batch["latents"].to(self.device)
        text = batch["text"].to(self.device)
        sigma = sample_sigmas((x.shape[0],), self.shift, generator=generator).to(self.device)
        noise = torch.randn(x.shape, generator=generator).to(self.device)
        v = model(noise_latents(x, noise, sigma.view(-1, 1, 1, 1, 1)), sigma * 1000.0, text)
        return (v.float() - velocity_target(x, noise).float()).pow(2).mean(), x.numel()


def sample(model: nn.Module, text: torch.Tensor, seeds: list[int], steps: list[int], chunk_frames: int,
           frames: int, latent_hw: tuple[int, int], shift: float = 5.0, adapter: str | None = "keep") -> torch.Tensor:
    """Streaming samples [len(seeds), C, frames, H, W] (one per seed, noise from torch.Generator(seed)) with the given
    timestep list; adapter: "keep" = the model as it is, else the adapter name to select (None = bare base)."""
    engine = rollout_engine(model, chunk_frames, frames, steps, shift, latent_hw, 1)
    out = []
    ctx = contextlib.nullcontext() if adapter == "keep" else use_adapter(model, adapter)
    with torch.no_grad(), ctx:
        for i, s in enumerate(seeds):
            z = torch.randn((1, model.cfg.in_channels, frames, *latent_hw), generator=torch.Generator().manual_seed(s))
            out.append(rollout(engine, text[i % text.shape[0]][None], z, grad=False))
    return torch.cat(out)
