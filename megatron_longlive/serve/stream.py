"""One live stream: prompt switches applied between chunks, chunks decoded frame by frame as they are made.

`LiveStream` owns a `StreamingEngine` (its own KV cache), a noise generator and a `StreamingDecoder`.
`next_chunk()` first applies the latest pending prompt (the switch lands exactly on the chunk boundary),
then denoises one chunk and returns its pixel frames as uint8 [T, H, W, 3]. The causal Wan VAE decodes
latent frame by latent frame with a cache of past conv inputs, so decoding per chunk gives the same frames
as decoding the whole video at once (tested against `WanVAE.decode`).
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np
import torch

from ..config import RunConfig
from ..inference.engine import StreamingEngine
from ..inference.video_writer import to_uint8_frames
from ..models.wan.text_encoder import TextEncoder
from ..models.wan.vae import WanVAE


class StreamingDecoder:
    """Decode normalized latents [B, C, F, h, w] chunk after chunk; the concatenation equals one full decode.

    Mirrors diffusers' `AutoencoderKLWan._decode` loop (one latent frame per decoder call, causal conv cache)
    but keeps the cache here between calls instead of clearing it."""

    def __init__(self, vae: WanVAE):
        model = vae.model
        if model.use_tiling:
            raise ValueError("StreamingDecoder: the VAE has tiling enabled. Fix: call vae.model.disable_tiling()")
        self.vae = vae
        self.feat_map: list = [None] * model._cached_conv_counts["decoder"]
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Next latent frames [B, C, F, h, w] -> pixels [B, 3, T, H, W] in [-1, 1] (T = 1 + 4(F-1) first, 4F after)."""
        model = self.vae.model
        x = model.post_quant_conv(self.vae.denormalize(latents.to(self.vae.dtype)))
        outs = []
        for i in range(x.shape[2]):
            outs.append(model.decoder(x[:, :, i:i + 1], feat_cache=self.feat_map, feat_idx=[0],
                                      first_chunk=self.first))
            self.first = False
        out = torch.cat(outs, dim=2)
        if model.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=model.config.patch_size)
        return out.clamp(-1, 1)


@dataclasses.dataclass(frozen=True)
class Switch:
    """A prompt that took effect: chunks >= `chunk` are conditioned on `prompt`."""

    chunk: int
    prompt: str
    new_shot: bool


class LiveStream:
    """An endless chunk stream whose prompt can change between chunks (thread-safe `request_switch`)."""

    def __init__(self, cfg: RunConfig, model, vae: WanVAE, text_encoder: TextEncoder, prompt: str,
                 recache: bool = True, embed_cache: "OrderedDict | None" = None,
                 seed_latents: torch.Tensor | None = None):
        """seed_latents: clean latents of the first frames (image-to-video, `conditioning.load_seed`)."""
        inf = cfg.infer
        stride = vae.spatial_stride
        if inf.height % stride or inf.width % stride:
            raise ValueError(f"infer.height/width={inf.height}x{inf.width} must be multiples of the VAE stride "
                             f"{stride}")
        self.engine = StreamingEngine(model, inf, (inf.height // stride, inf.width // stride), batch=1,
                                      step=inf.chunk_step)
        if self.engine.guidance:                         # classifier-free guidance: infer.negative_prompt's stream
            self.engine.set_negative_prompt(text_encoder.encode([inf.negative_prompt]))
        if seed_latents is not None:
            self.engine.start_from_latents(seed_latents)
        self.decoder = StreamingDecoder(vae)
        self.text_encoder = text_encoder
        self.recache = recache
        self.gen = torch.Generator().manual_seed(inf.seed)
        self.shape = (1, *self.engine.latent_shape)
        self._embeds = embed_cache if embed_cache is not None else OrderedDict()
        self._lock = threading.Lock()
        self._pending: tuple[str, bool] | None = None
        self._boundary = 0                             # first chunk not started yet
        self.switches: list[Switch] = []
        self.latents: list[torch.Tensor] = []          # clean latent chunks [1, C, F, h, w] (CPU)
        self.request_switch(prompt)

    def request_switch(self, prompt: str, new_shot: bool = False) -> int:
        """Queue a prompt for the next chunk boundary -> the chunk it will apply to (the next one not started).
        A later request before that boundary replaces it."""
        with self._lock:
            self._pending = (prompt, new_shot)
            return self._boundary

    def _embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self._embeds:
            self._embeds[prompt] = self.text_encoder.encode([prompt])
            while len(self._embeds) > 64:
                self._embeds.popitem(last=False)
        return self._embeds[prompt]

    @torch.no_grad()
    def next_chunk(self) -> tuple[int, Switch | None, np.ndarray]:
        """Apply a pending switch, generate and decode one chunk -> (chunk index, switch or None, uint8 [T, H, W, 3])."""
        c = self.engine.chunk_index
        with self._lock:
            pending, self._pending = self._pending, None
            self._boundary = c + 1
        switch = None
        if pending is not None:
            prompt, new_shot = pending
            # the first prompt has nothing cached to recache
            self.engine.set_prompt(self._embed(prompt), recache=self.recache and c > 0, new_shot=new_shot)
            switch = Switch(c, prompt, new_shot)
            self.switches.append(switch)
        clean = self.engine.generate_chunk(torch.randn(self.shape, generator=self.gen))  # [1, C, F, h, w]
        self.latents.append(clean.cpu())
        video = self.decoder.decode(clean.to(self.decoder.vae.dtype)).float()            # [1, 3, T, H, W]
        return c, switch, to_uint8_frames(video[0])
