"""Teacher forcing for chunk-autoregressive video diffusion (DESIGN.md §3): pure functions.

Sequence layout (global order): clean chunks x_0..x_{n-1}, then noisy chunks z_0..z_{n-1}; every
chunk is `chunk_frames` latent frames of `tokens_per_frame` tokens. Block id of clean chunk i is i,
of noisy chunk i is n + i. Attention rule (block granularity):
  * clean x_i attends clean x_j for j <= i;
  * noisy z_i attends clean x_j for j < i, and itself; never another noisy chunk.
A clean chunk and its noisy twin share RoPE positions; each noisy chunk has its own sigma on Wan's
shifted flow schedule; the loss is the flow-matching velocity MSE on noisy tokens only.

Optional, all off by default (the default path is unchanged bit for bit):
  * per-chunk text (multi-shot): `text` [B, N, L, text_dim] with `chunk_text` [B, n]; clean x_i and noisy
    z_i cross-attend caption chunk_text[b, i] (`models/wan/text_context.FrameText`);
  * a separate clean history (`history`): the clean half is built from it (error recycling puts the model's
    own degraded predictions there); noisy twins and loss targets always come from the data;
  * first-frame conditioning (`cond_first`): the noisy twin of chunk 0 keeps its first token frame clean
    (t = 0, no loss), so the model learns image-to-video (Wan2.2-TI2V style).
"""
from __future__ import annotations

import dataclasses

import torch

from ..inference.sinks import SinkRule, visible_chunks
from ..models.wan.attention import ChunkMask
from ..models.wan.rope import grid_positions
from ..models.wan.text_context import frame_text_context
from .schedule import noise_latents, sample_sigmas, sigma_to_timestep, velocity_target


def tf_block_table(num_chunks: int, device: torch.device | str | None = None, rule: SinkRule | None = None,
                   shot_starts: tuple[int, ...] = (0,)) -> torch.Tensor:
    """[2n, 2n] bool: allowed[q_block, kv_block] for the [clean | noisy] block order.

    rule=None: full causal history. With a `SinkRule` (long multi-shot tuning), clean x_i and noisy z_i
    attend exactly the earlier clean chunks `inference.sinks.visible_chunks(i, shot_starts, rule)` - the
    context the streaming engine's cache holds for chunk i - plus themselves."""
    n = num_chunks
    idx = torch.arange(n, device=device)
    allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=device)
    if rule is None:
        allowed[:n, :n] = idx[None, :] < idx[:, None]   # clean -> strictly earlier clean
    else:
        for i in range(n):
            allowed[i, visible_chunks(i, shot_starts, rule)] = True
    allowed[n:, :n] = allowed[:n, :n]                   # noisy z_i sees the clean context x_i was cached with
    allowed[:n, :n] |= torch.eye(n, dtype=torch.bool, device=device)  # clean -> itself
    allowed[n:, n:] = torch.eye(n, dtype=torch.bool, device=device)   # noisy -> itself
    return allowed


def tf_block_ids(num_chunks: int, chunk_frames: int, tokens_per_frame: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """[2 * n * chunk_frames * tokens_per_frame] block id of each token in [clean | noisy] order."""
    per_chunk = chunk_frames * tokens_per_frame
    return torch.arange(2 * num_chunks, device=device).repeat_interleave(per_chunk)


def teacher_forcing_mask(num_chunks: int, chunk_frames: int, tokens_per_frame: int,
                         device: torch.device | str | None = None, rule: SinkRule | None = None,
                         shot_starts: tuple[int, ...] = (0,)) -> ChunkMask:
    """The teacher-forcing mask over the [clean | noisy] token sequence (see `tf_block_table`)."""
    ids = tf_block_ids(num_chunks, chunk_frames, tokens_per_frame, device)
    return ChunkMask(ids, ids, tf_block_table(num_chunks, device, rule, shot_starts))


# ----- assembling the [clean | noisy] sequence and the loss ------------------------------------------

@dataclasses.dataclass
class TFInputs:
    """Everything the model needs for one teacher-forcing forward (F' = token frames after temporal patching).

    tokens: [B, 2S, D] patch embeddings, clean half then noisy half (S = F' * tokens_per_frame);
    t: [B, 2F'] timesteps per token frame (0 for the clean half); positions: [2S, 3] RoPE positions, the
    clean grid repeated so a chunk and its noisy twin share positions; mask: the teacher-forcing ChunkMask;
    grid: (F', H', W') of one half; target: [B, C, F, H, W] velocity eps - x of the noisy half;
    loss_weight: None (every noisy element carries loss) or [B, F] 1.0 / 0.0 per noisy latent frame.
    """

    tokens: torch.Tensor
    t: torch.Tensor
    positions: torch.Tensor
    mask: ChunkMask
    grid: tuple[int, int, int]
    target: torch.Tensor
    num_chunks: int
    chunk_frames: int
    loss_weight: torch.Tensor | None = None

    @property
    def num_clean_tokens(self) -> int:
        return self.tokens.shape[1] // 2


def chunk_to_frames(per_chunk: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """[B, n] per-chunk values -> [B, n * chunk_frames] per-frame values."""
    return per_chunk.repeat_interleave(chunk_frames, dim=1)


def build_tf_inputs(model, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, chunk_frames: int,
                    num_train_timesteps: int = 1000, rule: SinkRule | None = None,
                    shot_starts: tuple[int, ...] = (0,), history: torch.Tensor | None = None,
                    cond_first: torch.Tensor | None = None) -> TFInputs:
    """Noise every chunk at its own sigma and assemble the [clean | noisy] token sequence.

    latents, noise: [B, C, F, H, W] (F latent frames, a multiple of chunk_frames); sigma: [B, n] per chunk.
    `model` provides `patchify` and `cfg.patch_size` (a WanDiT). rule/shot_starts: the sink/window mask
    the engine uses (see `tf_block_table`); None = full causal history.
    history: [B, C, F, H, W] latents of the clean half (default `latents`); noisy twins and targets use `latents`.
    cond_first: [B] bool; True = the noisy twin of chunk 0 keeps its first token frame (temporal patch) clean,
    at t = 0 and without loss (image-to-video conditioning).
    """
    b, _, f, _, _ = latents.shape
    pt = model.cfg.patch_size[0]
    assert f % chunk_frames == 0, f"latent frames {f} must be a multiple of chunk_frames {chunk_frames}"
    assert chunk_frames % pt == 0, f"chunk_frames {chunk_frames} must be a multiple of the temporal patch {pt}"
    n = f // chunk_frames
    assert sigma.shape == (b, n), f"sigma {tuple(sigma.shape)} must be [batch, num_chunks] = {(b, n)}"
    # 1. noisy twin of every chunk: z_i = (1 - s_i) x_i + s_i eps_i
    sigma_f = chunk_to_frames(sigma, chunk_frames).to(latents.dtype)          # [B, F]
    noisy = noise_latents(latents, noise, sigma_f[:, None, :, None, None])
    weight = None
    if cond_first is not None and bool(cond_first.any()):
        # 1b. conditioned videos: the first token frame of z_0 is the clean latent, carrying no loss
        cond = cond_first.to(latents.device)
        keep = cond[:, None, None, None, None]
        noisy = torch.cat([torch.where(keep, latents[:, :, :pt], noisy[:, :, :pt]), noisy[:, :, pt:]], dim=2)
        weight = torch.ones(b, f, dtype=torch.float32, device=latents.device)
        weight[:, :pt] = (~cond).float()[:, None]
    # 2. tokens of both halves (same patch embedding), frame-major raster order
    clean_tok, grid = model.patchify(latents if history is None else history)  # [B, S, D]
    noisy_tok, _ = model.patchify(noisy)
    tokens = torch.cat([clean_tok, noisy_tok], dim=1)                         # [B, 2S, D]
    # 3. per token-frame timesteps: 0 for clean, sigma * 1000 for noisy (one value per temporal patch)
    sigma_hi = chunk_to_frames(sigma, chunk_frames).to(torch.promote_types(sigma.dtype, torch.float32))
    t_noisy = sigma_to_timestep(sigma_hi[:, ::pt], num_train_timesteps)      # [B, F']
    if weight is not None:
        t_noisy = t_noisy.clone()
        t_noisy[:, 0] = torch.where(cond, torch.zeros_like(t_noisy[:, 0]), t_noisy[:, 0])
    t = torch.cat([torch.zeros_like(t_noisy), t_noisy], dim=1)               # [B, 2F']
    # 4. positions: the clean grid, repeated for the noisy half
    pos = grid_positions(*grid, device=latents.device)                        # [S, 3]
    positions = torch.cat([pos, pos], dim=0)
    # 5. the block mask, chunk = block
    mask = teacher_forcing_mask(n, chunk_frames // pt, grid[1] * grid[2], latents.device, rule, shot_starts)
    return TFInputs(tokens, t, positions, mask, grid, velocity_target(latents, noise), n, chunk_frames, weight)


def tf_text_context(model, text: torch.Tensor, chunk_text: torch.Tensor | None, chunk_frames: int) -> list:
    """Cross-attention context of the [clean | noisy] sequence.

    chunk_text None: `text` [B, L, text_dim] is the one caption of each video (`model.embed_context`).
    Else `text` [B, N, L, text_dim] holds N captions per video and chunk_text [B, n] the caption of every
    chunk: clean x_i and noisy z_i attend caption chunk_text[b, i] (a `FrameText` per layer).
    """
    if chunk_text is None:
        return model.embed_context(text)
    if text.ndim != 4:
        raise ValueError(f"per-chunk text needs text [B, N, L, text_dim], got {tuple(text.shape)}")
    frames = chunk_to_frames(chunk_text.long(), chunk_frames // model.cfg.patch_size[0])  # [B, F'] per half
    return frame_text_context(model, text, torch.cat([frames, frames], dim=1).to(text.device))


def tf_forward(model, inputs: TFInputs, context_kv: list) -> torch.Tensor:
    """Head output over the whole [clean | noisy] sequence: [B, 2S, prod(patch) * C].

    context_kv: `tf_text_context(...)` - `model.embed_context(text)` for one caption per video, or
    per-layer `FrameText`s for per-chunk captions; the sequence layout does not change.
    """
    return model.forward_tokens(inputs.tokens, inputs.t, context_kv, inputs.positions, inputs.mask)


def noisy_prediction(model, out: torch.Tensor, inputs: TFInputs) -> torch.Tensor:
    """Velocity prediction of the noisy half as latents [B, C, F, H, W]; the clean half is dropped."""
    return model.unpatchify(out[:, inputs.num_clean_tokens:], inputs.grid)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the velocity over noisy tokens, in float32. pred, target: [B, C, F, H, W].

    weight: None, or [B, F] 1.0 / 0.0 per latent frame: the mean over loss-bearing frames only."""
    err = (pred.float() - target.float()).pow(2)
    if weight is None:
        return err.mean()
    w = weight.to(err.device, err.dtype)[:, None, :, None, None]
    per_frame = err.shape[1] * err.shape[3] * err.shape[4]                    # C * H * W elements per frame
    return (err * w).sum() / (w.sum() * per_frame).clamp(min=1)


def per_chunk_loss(pred: torch.Tensor, target: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """[B, n] MSE per video and chunk (for diagnostics and causality checks)."""
    err = (pred.float() - target.float()).pow(2)                              # [B, C, F, H, W]
    b, c, f, h, w = err.shape
    return err.view(b, c, f // chunk_frames, chunk_frames, h, w).mean(dim=(1, 3, 4, 5))


def teacher_forcing_loss(model, latents: torch.Tensor, text: torch.Tensor, chunk_frames: int,
                         generator: torch.Generator | None = None, shift: float = 5.0,
                         num_train_timesteps: int = 1000, chunk_text: torch.Tensor | None = None,
                         first_frame_prob: float = 0.0, recycler=None, rule: SinkRule | None = None,
                         shot_starts: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, TFInputs]:
    """Sample per-chunk sigmas and noise (on `generator`, CPU), run the TF forward, return (loss, inputs).

    latents: [B, C, F, H, W]; text: [B, L, text_dim] one caption per video, or [B, N, L, text_dim] with
    chunk_text [B, n] the caption of every chunk (multi-shot). first_frame_prob: chance per video that
    chunk 0's first token frame is a clean conditioning frame (drawn on `generator` after the noise).
    recycler: an `error_recycling.ErrorRecycler` (degrades the clean history, then records this step's
    errors) or None. rule/shot_starts: the engine's sink/window mask (long tuning, `tf_block_table`).
    With the defaults this is the plain teacher-forcing loss.
    """
    b, f = latents.shape[0], latents.shape[2]
    sigma = sample_sigmas((b, f // chunk_frames), shift, num_train_timesteps, generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    cond = torch.rand(b, generator=generator) < first_frame_prob if first_frame_prob > 0 else None
    history, kept_clean = None, None
    if recycler is not None:
        keep = model.cfg.patch_size[0] if cond is not None else 0          # the conditioning frame stays exact
        history, kept_clean = recycler.degrade(latents, chunk_frames, keep_first=keep, keep_mask=cond)
    inputs = build_tf_inputs(model, latents, noise, sigma.to(latents.device), chunk_frames, num_train_timesteps,
                             rule, tuple(shot_starts), history=history, cond_first=cond)
    out = tf_forward(model, inputs, tf_text_context(model, text, chunk_text, chunk_frames))
    pred = noisy_prediction(model, out, inputs)
    if recycler is not None:
        recycler.record(pred, inputs.target, sigma, chunk_frames, kept_clean, inputs.loss_weight)
    return flow_matching_loss(pred, inputs.target, inputs.loss_weight), inputs
