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
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..config import InferConfig
from ..models.wan.attention import block_causal_mask
from ..models.wan.model import WanDiT
from ..models.wan.rope import grid_positions
from ..training.schedule import shift_sigma, sigma_to_timestep
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
                 keep_latents: bool = True, kv_cache: str = "bf16"):
        if infer.guidance_scale != 1.0:
            raise ValueError(f"infer.guidance_scale={infer.guidance_scale}: classifier-free guidance is not "
                             f"supported by the streaming engine yet. Fix: set infer.guidance_scale=1.0")
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
        # kv_cache: "bf16" (the model's dtype) or "nvfp4" (packed 4-bit pages, quant.kv_cache); the NVFP4
        # cache hands the model dequantized K/V ("dequant" attention) so the model stays unchanged.
        from ..quant.nvfp4.kv_cache import build_kv_cache  # imported here: that module imports this package

        self.cache = build_kv_cache(kv_cache, self.layout, cfg.num_layers, batch, cfg.num_heads, cfg.head_dim,
                                    self.latent_shape if keep_latents else None, self.dtype, self.device,
                                    attention="dequant")
        self.sigmas = sampling_sigmas(infer.denoising_steps, infer.timestep_shift)
        self.batch = batch
        self.context_kv: list | None = None
        self.chunk_index = 0

    # ----- state --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new video (prompt kept)."""
        self.cache.reset()
        self.chunk_index = 0
        self.shot_starts = [0]

    @torch.no_grad()
    def set_prompt(self, text: torch.Tensor, recache: bool = False, new_shot: bool = False) -> None:
        """Text embeddings [B, L, text_dim] -> cross-attention K/V of every layer, used by later chunks.

        new_shot: the next chunk starts a shot (it replaces the shot sink). recache: recompute the stored
        chunks' K/V under the new prompt from their clean latents."""
        self.context_kv = self.model.embed_context(text.to(self.device, self.dtype))
        if new_shot and self.chunk_index not in self.shot_starts:
            self.shot_starts.append(self.chunk_index)
            self.cache.clear_shot_sink()
        if recache:
            self.recache()

    def _positions(self, chunk_index: int) -> torch.Tensor:
        return grid_positions(*self.grid, frame_offset=chunk_index * self.grid[0], device=self.device)

    def _timesteps(self, value: float, chunks: int = 1) -> torch.Tensor:
        t = sigma_to_timestep(torch.tensor(value, dtype=torch.float64))
        return t.to(torch.float32).expand(self.batch, chunks * self.grid[0]).to(self.device)

    def _forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """One DiT pass of the current chunk x [B, C, F, H, W] at `sigma`, attending the cache."""
        assert self.context_kv is not None, "call set_prompt() before generating"
        stored = [c for c, _ in self.cache.stored_chunks()]
        assert stored == visible_chunks(self.chunk_index, self.shot_starts, self.rule), \
            f"cache holds chunks {stored}, the sink rule says {visible_chunks(self.chunk_index, self.shot_starts, self.rule)}"
        tokens, _ = self.model.patchify(x.to(self.dtype))
        out = self.model.forward_tokens(tokens, self._timesteps(sigma), self.context_kv,
                                        self._positions(self.chunk_index), kv_cache=self.cache)
        return self.model.unpatchify(out, self.grid)

    # ----- the chunk step -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Velocity of the current chunk x [B, C, F, H, W] at noise level sigma (the cache is not changed)."""
        return self._forward(x, sigma)

    @torch.no_grad()
    def commit(self, clean: torch.Tensor) -> None:
        """Run the clean chunk at t = 0, store its K/V (sink first, then window), advance the chunk counter."""
        self._forward(clean, 0.0)
        c, latents = self.chunk_index, clean.to(self.dtype)
        role = chunk_role(c, normalize_shot_starts(self.shot_starts), self.rule)
        if role == "window":
            self.cache.append(c, latents)
        else:
            self.cache.set_sink(c, role, latents)
        self.chunk_index += 1

    @torch.no_grad()
    def generate_chunk(self, noise: torch.Tensor) -> torch.Tensor:
        """Denoise one chunk from noise [B, C, F, H, W] on the sigma list, commit it, return it (float32)."""
        x = noise.to(self.device, torch.float32)
        for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            v = self.predict(x, sigma).float()
            x = x + (sigma_next - sigma) * v
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
            latents = torch.cat([self.cache.latents[slot] for _, slot in chunks], dim=2)  # [B, C, n*F, H, W]
            tokens, _ = self.model.patchify(latents)
            positions = torch.cat([self._positions(c) for c in order])
            mask = block_causal_mask(len(order) * self.grid[0], self.grid[1] * self.grid[2], self.grid[0],
                                     self.device)
            self.model.forward_tokens(tokens, self._timesteps(0.0, len(order)), self.context_kv, positions, mask,
                                      kv_cache=self.cache)
        finally:
            self.cache.end_recache()


def stream_latents(engine: StreamingEngine, num_chunks: int, prompt_for_chunk: Callable[[int], "torch.Tensor | None"],
                   seed: int = 0, progress: bool = True) -> Iterator[torch.Tensor]:
    """Yield `num_chunks` clean latent chunks [B, C, F, H, W].

    prompt_for_chunk(c) returns new text embeddings when the prompt changes at chunk c, else None.
    Noise is drawn on a CPU generator seeded with `seed`, so results do not depend on the device.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (engine.batch, *engine.latent_shape)
    for c in tqdm(range(num_chunks), desc="generate", unit="chunk", disable=not progress):
        text = prompt_for_chunk(c)
        if text is not None:
            engine.set_prompt(text)
        yield engine.generate_chunk(torch.randn(shape, generator=gen))
