"""Streaming chunk-autoregressive sampler (DESIGN.md §6): denoise a chunk against the KV cache, then cache it.

Per chunk c (latents [B, C, chunk_frames, H, W], RoPE frames counting from c * chunk_frames forever):
  1. k denoising passes on the timestep list, each attending the cache (sinks + window + itself);
     Euler flow-matching step x <- x + (sigma_next - sigma) * v, the last step lands on sigma = 0;
  2. one pass of the clean chunk at t = 0 that writes its K/V into the cache's current region;
  3. commit: the chunk's role under `sinks.chunk_role` (the rule shared with teacher forcing) puts it in
     the global sink, the current shot's sink, or the rolling window (the oldest is evicted). Before every
     pass the cache holds exactly `sinks.visible_chunks(c, shot_starts, rule)` (asserted).
Text conditioning enters through `set_prompt`: cross-attention K/V are computed once per prompt. A
prompt switch may `recache` the stored chunks' K/V under the new prompt (LongLive's KV recache).

Classifier-free guidance (`guidance=True`, default when infer.guidance_scale != 1): every pass runs ONE
forward with batch 2B, rows [0, B) conditioned on the prompt and rows [B, 2B) on the negative prompt
(cross-attention K/V stacked in the batch dim), so the self-attention cache holds both streams' K/V side
by side and sinks, window, eviction and recache move them together. v = v_u + s * (v_c - v_u), s per call.

Seeding (image-to-video, video continuation): `start_from_latents(z)` makes the first T latent frames of
the video the given clean latents. Whole chunks of them are committed as they are (chunk 0 lands in the
global sink and stays for the whole stream); a partial last chunk is generated with its given frames held
clean: overwritten before and after every step and run at per-frame timestep 0 (Wan2.2-TI2V, LongLive).
"""
from __future__ import annotations

from typing import Callable, Collection, Iterator, Sequence

import torch
from tqdm import tqdm

from ..config import InferConfig
from ..models.wan.attention import block_causal_mask
from ..models.wan.model import WanDiT
from ..models.wan.rope import grid_positions
from ..training.schedule import shift_sigma, sigma_to_timestep
from .chunk_step import ChunkStep
from .fp8_kv_cache import with_static_bounds
from .kv_cache import CacheLayout, KVCache
from .sinks import SinkRule, chunk_role, normalize_shot_starts, visible_chunks


def sampling_sigmas(steps: Sequence[int], shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Timestep list (e.g. [1000, 750, 500, 250]) -> shifted sigmas with a final 0: [s_0 > ... > s_{k-1}, 0]."""
    s = torch.tensor([t / num_train_timesteps for t in steps], dtype=torch.float64)
    sig = shift_sigma(s, shift).tolist()
    if any(a <= b for a, b in zip(sig, sig[1:])):
        raise ValueError(f"infer.denoising_steps={list(steps)} must be strictly decreasing. Fix: sort them high to low")
    return sig + [0.0]


class StreamingEngine:
    """Chunk loop over a `WanDiT` with a preallocated KV cache. Latent-space in, latent-space out."""

    def __init__(self, model: WanDiT, infer: InferConfig, latent_size: tuple[int, int], batch: int = 1,
                 keep_latents: bool = True, kv_cache: str = "bf16", guidance: bool | None = None,
                 step: str = "eager"):
        """guidance: keep a negative-prompt stream for classifier-free guidance (None: infer.guidance_scale != 1).
        step: how chunk passes run - eager, compile, cuda_graph, compile+cuda_graph or auto (chunk_step.py)."""
        self.guidance = infer.guidance_scale != 1.0 if guidance is None else guidance
        self.model = model
        self.infer = infer
        cfg = model.cfg
        pt, ph, pw = cfg.patch_size
        h, w = latent_size
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}. "
                             f"Fix: choose infer.height/width so the latent grid is a multiple of the patch")
        self.grid = (infer.chunk_frames // pt, h // ph, w // pw)    # token grid of one chunk
        self.latent_shape = (cfg.in_channels, infer.chunk_frames, h, w)
        self.layout = CacheLayout.from_config(infer, self.grid[1] * self.grid[2], pt)
        self.rule = SinkRule.from_layout(self.layout)
        self.shot_starts: list[int] = [0]      # chunk indices where shots start (new_shot=True)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # rows of every forward and of the cache: [cond (B) | uncond (B)] with guidance, else B
        self.rows = 2 * batch if self.guidance else batch
        self.cache = self._build_cache(kv_cache, keep_latents)
        self.step = ChunkStep(model, self.cache, step)
        self.sigmas = sampling_sigmas(infer.denoising_steps, infer.timestep_shift)
        self.batch = batch
        self.context_kv: list | None = None      # per layer (k, v) [rows, L, H, D]
        self._cond_kv: list | None = None        # the prompt's K/V per layer [B, L, H, D]
        self._neg_kv: list | None = None         # guidance: the negative prompt's
        self.seed_latents: torch.Tensor | None = None   # [B, C, T, H, W] clean first frames (start_from_latents)
        self.chunk_index = 0

    def _build_cache(self, kind: str, keep_latents: bool) -> KVCache:
        """kind: "bf16" (the model's dtype) or "nvfp4" (packed 4-bit pages, quant.kv_cache); infer.attention picks
        what the cache hands self-attention: K/V tensors (sdpa; the NVFP4 cache dequantizes) or a window object
        that attends itself with a Triton kernel (fp8, triton), so the model stays unchanged. The SP engine
        (distributed/sp_inference.py) overrides this with a head-sharded cache."""
        from ..quant.nvfp4.kv_cache import build_kv_cache  # imported here: that module imports this package

        cfg = self.model.cfg
        cache = build_kv_cache(kind, self.layout, cfg.num_layers, self.rows, cfg.num_heads, cfg.head_dim,
                               self.latent_shape if keep_latents else None, self.dtype, self.device,
                               attention=self.infer.attention)
        return with_static_bounds(cache, self.model)

    def _forward_tokens(self, tokens: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, mask=None,
                        need_output: bool = True) -> torch.Tensor | None:
        """The model pass over assembled tokens [rows, S, D], attending and writing the cache. The SP engine
        overrides it to run this rank's share of the tokens; need_output=False: the caller drops the output."""
        if mask is None and self.step.mode != "eager":     # a chunk pass: compiled / CUDA-graphed
            return self.step(tokens, t, self.context_kv, positions, need_output)
        return self.model.forward_tokens(tokens, t, self.context_kv, positions, mask, kv_cache=self.cache,
                                         need_output=need_output)

    # ----- state --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new video (prompts kept, seed latents dropped)."""
        self.cache.reset()
        self.chunk_index = 0
        self.shot_starts = [0]
        self.seed_latents = None

    @torch.no_grad()
    def set_prompt(self, text: torch.Tensor, recache: bool = False, new_shot: bool = False,
                   negative: torch.Tensor | None = None) -> None:
        """Text embeddings [B, L, text_dim] -> cross-attention K/V of every layer, used by later chunks.

        new_shot: the next chunk starts a shot (it replaces the shot sink). recache: recompute the stored
        chunks' K/V under the new prompt from their clean latents (both streams under guidance).
        negative: the negative prompt's embeddings (guidance only; kept until given again)."""
        if negative is not None:
            self.set_negative_prompt(negative)
        self._cond_kv = self.model.embed_context(text.to(self.device, self.dtype))
        self._stack_context()
        if new_shot and self.chunk_index not in self.shot_starts:
            self.shot_starts.append(self.chunk_index)
            self.cache.clear_shot_sink()
        if recache:
            self.recache()

    @torch.no_grad()
    def set_negative_prompt(self, negative: torch.Tensor) -> None:
        """Negative prompt embeddings [B, L, text_dim] of the guidance stream (kept until set again)."""
        if not self.guidance:
            raise ValueError("a negative prompt was given but this engine has no guidance stream. Fix: set "
                             "infer.guidance_scale != 1 or build StreamingEngine(..., guidance=True)")
        if negative.shape[0] == 1 and self.batch > 1:
            negative = negative.expand(self.batch, *negative.shape[1:])    # one negative prompt for every video
        self._neg_kv = self.model.embed_context(negative.to(self.device, self.dtype))
        if self._cond_kv is not None:
            self._stack_context()

    def _stack_context(self) -> None:
        """context_kv per layer: the prompt's K/V, with guidance stacked over the negative prompt's [2B, L, H, D]."""
        if not self.guidance:
            self.context_kv = self._cond_kv
            return
        if self._neg_kv is None:
            raise ValueError("classifier-free guidance needs a negative prompt. Fix: call "
                             "engine.set_negative_prompt(embeddings) first (Wan's default: the empty string's)")
        (kc, _), (kn, _) = self._cond_kv[0], self._neg_kv[0]
        if kc.shape != kn.shape:
            raise ValueError(f"negative prompt K/V {tuple(kn.shape[:2])} do not match the prompt's {tuple(kc.shape[:2])}"
                             f" (batch, text length). Fix: encode both with the same text encoder, one row per video")
        self.context_kv = [(torch.cat([kc, kn]), torch.cat([vc, vn]))
                           for (kc, vc), (kn, vn) in zip(self._cond_kv, self._neg_kv)]

    def _positions(self, chunk_index: int) -> torch.Tensor:
        return grid_positions(*self.grid, frame_offset=chunk_index * self.grid[0], device=self.device)

    def _timesteps(self, value: float, chunks: int = 1, clean_frames: int = 0) -> torch.Tensor:
        """[rows, chunks * token frames] timesteps at `value`; the first `clean_frames` latent frames at 0."""
        t = sigma_to_timestep(torch.tensor(value, dtype=torch.float64))
        t = t.to(torch.float32).expand(self.rows, chunks * self.grid[0]).to(self.device)
        if clean_frames:
            t = t.clone()
            t[:, :clean_frames // self.model.cfg.patch_size[0]] = 0.0
        return t

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [rows, ...]: the same latents for the conditional and unconditional halves."""
        return torch.cat([x, x]) if self.guidance else x

    # ----- seeding: image-to-video, video continuation ---------------------------------------------------
    def start_from_latents(self, latents: torch.Tensor) -> None:
        """Make the given clean latents [B, C, T, H, W] the first T latent frames of a new video (chunk 0 on).

        `generate_chunk` then returns the seeded chunks as they are (after caching them) and holds the
        seeded frames of a partial chunk clean while generating the rest of it. An image is T = 1."""
        if self.chunk_index != 0:
            raise RuntimeError(f"start_from_latents() at chunk {self.chunk_index}: seed a fresh stream. Fix: call "
                               f"engine.reset() first")
        b, c, t, h, w = latents.shape
        if (b, c, h, w) != (self.batch, *self.latent_shape[:1], *self.latent_shape[2:]):
            raise ValueError(f"seed latents {tuple(latents.shape)} do not match the engine's [batch={self.batch}, "
                             f"C={self.latent_shape[0]}, T, {self.latent_shape[2]}, {self.latent_shape[3]}]. Fix: "
                             f"encode the image/clip at infer.height x infer.width with the model's VAE")
        pt = self.model.cfg.patch_size[0]
        if t % pt:
            raise ValueError(f"{t} seed latent frames are not a multiple of the temporal patch size {pt}")
        if self.layout.num_sink_chunks == 0:
            raise ValueError("infer.sink_frames=0: the seed (image) latents would leave the attention context once "
                             "the window rolls. Fix: set infer.sink_frames >= infer.chunk_frames")
        self.seed_latents = latents.to(self.device, torch.float32)

    def _seed_frames(self) -> torch.Tensor | None:
        """The seeded clean latent frames [B, C, k, H, W] of the current chunk (k <= chunk_frames), or None."""
        if self.seed_latents is None:
            return None
        cf = self.latent_shape[1]
        start = self.chunk_index * cf
        if start >= self.seed_latents.shape[2]:
            return None
        return self.seed_latents[:, :, start:start + cf]

    def _hold(self, x: torch.Tensor, seed: torch.Tensor | None) -> torch.Tensor:
        """x with its first frames replaced by the seeded clean frames."""
        if seed is None:
            return x
        return torch.cat([seed.to(x.dtype), x[:, :, seed.shape[2]:]], dim=2)

    def _forward(self, x: torch.Tensor, sigma: float, need_output: bool = True) -> torch.Tensor | None:
        """One DiT pass of the current chunk x [B, C, F, H, W] at `sigma`, attending the cache -> [rows, ...]
        (need_output=False: only the cache is written, see `WanDiT.forward_tokens`; returns None)."""
        assert self.context_kv is not None, "call set_prompt() before generating"
        stored = [c for c, _ in self.cache.stored_chunks()]
        assert stored == visible_chunks(self.chunk_index, self.shot_starts, self.rule), \
            f"cache holds chunks {stored}, the sink rule says {visible_chunks(self.chunk_index, self.shot_starts, self.rule)}"
        seed = self._seed_frames()
        x = self._hold(x, seed)
        tokens, _ = self.model.patchify(self._rows(x).to(self.dtype))
        t = self._timesteps(sigma, clean_frames=0 if seed is None else seed.shape[2])
        out = self._forward_tokens(tokens, t, self._positions(self.chunk_index), need_output=need_output)
        return None if out is None or not need_output else self.model.unpatchify(out, self.grid)

    # ----- the chunk step -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, sigma: float, guidance_scale: float | None = None) -> torch.Tensor:
        """Velocity of the current chunk x [B, C, F, H, W] at noise level sigma (the cache is not changed).

        With guidance: v_u + s * (v_c - v_u) from one batched pass, s = guidance_scale or infer.guidance_scale,
        combined in float32 (returned as float32)."""
        if not self.guidance and guidance_scale not in (None, 1.0):
            raise ValueError(f"guidance_scale={guidance_scale} on an engine without a negative-prompt stream. "
                             f"Fix: build the engine with guidance=True (or infer.guidance_scale != 1)")
        out = self._forward(x, sigma)
        if not self.guidance:
            return out
        s = self.infer.guidance_scale if guidance_scale is None else guidance_scale
        cond, uncond = out.float().chunk(2)
        return uncond + s * (cond - uncond)

    @torch.no_grad()
    def commit(self, clean: torch.Tensor) -> None:
        """Run the clean chunk at t = 0, store its K/V (sink first, then window), advance the chunk counter."""
        clean = self._hold(clean, self._seed_frames())
        self._forward(clean, 0.0, need_output=False)      # the context pass: its output is never used
        c, latents = self.chunk_index, self._rows(clean).to(self.dtype)
        role = chunk_role(c, normalize_shot_starts(self.shot_starts), self.rule)
        if role == "window":
            self.cache.append(c, latents)
        else:
            self.cache.set_sink(c, role, latents)
        self.chunk_index += 1

    @torch.no_grad()
    def generate_chunk(self, noise: torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """Denoise one chunk from noise [B, C, F, H, W] on the sigma list, commit it, return it (float32).

        A fully seeded chunk (start_from_latents) is committed as given (noise unused); seeded frames of a
        partial chunk are held clean. guidance_scale overrides infer.guidance_scale for this chunk."""
        seed = self._seed_frames()
        x = self._hold(noise.to(self.device, torch.float32), seed)
        if seed is None or seed.shape[2] < x.shape[2]:
            for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
                v = self.predict(x, sigma, guidance_scale).float()
                x = self._hold(x + (sigma_next - sigma) * v, seed)
        self.commit(x)
        return x

    @torch.no_grad()
    def recache(self) -> None:
        """Rewrite the stored chunks' K/V under the current prompt: one t = 0 forward over their clean latents
        (temporal order, original positions, block-causal between chunks)."""
        assert self.cache.latents is not None, "recache needs keep_latents=True"
        chunks = self.cache.stored_chunks()
        if not chunks:
            return
        order = self.cache.begin_recache()
        try:
            latents = torch.cat([self.cache.latents[slot] for _, slot in chunks], dim=2)  # [rows, C, n*F, H, W]
            tokens, _ = self.model.patchify(latents)
            positions = torch.cat([self._positions(c) for c in order])
            mask = block_causal_mask(len(order) * self.grid[0], self.grid[1] * self.grid[2], self.grid[0],
                                     self.device)
            self._forward_tokens(tokens, self._timesteps(0.0, len(order)), positions, mask, need_output=False)
        finally:
            self.cache.end_recache()


def stream_latents(engine: StreamingEngine, num_chunks: int, prompt_for_chunk: Callable[[int], "torch.Tensor | None"],
                   seed: int = 0, progress: bool = True, shot_starts: Collection[int] = (),
                   recache_on_switch: bool = False) -> Iterator[torch.Tensor]:
    """Yield `num_chunks` clean latent chunks [B, C, F, H, W].

    prompt_for_chunk(c) returns new text embeddings when the prompt changes at chunk c, else None; a change
    at a chunk in `shot_starts` is a scene cut: a new shot (shot sink) and a KV recache of the stored chunks
    under the new prompt (recache_on_switch: every switch recaches). Noise is drawn on a CPU generator seeded
    with `seed`, so results do not depend on the device. Seeded chunks (start_from_latents) are yielded as given.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (engine.batch, *engine.latent_shape)
    for c in tqdm(range(num_chunks), desc="generate", unit="chunk", disable=not progress):
        text = prompt_for_chunk(c)
        if text is not None:
            cut = c in shot_starts
            engine.set_prompt(text, new_shot=cut,
                              recache=(cut or recache_on_switch) and engine.cache.latents is not None)
        yield engine.generate_chunk(torch.randn(shape, generator=gen))
