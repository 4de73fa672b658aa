"""Streaming generation settings for `longlive generate` / `longlive serve`."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import ConfigBase


@dataclasses.dataclass
class InferConfig(ConfigBase):
    """Chunk loop, sampling schedule and KV-cache geometry (all in latent frames)."""

    _section: ClassVar[str] = "infer"

    denoising_steps: list[int] = dataclasses.field(default_factory=lambda: [1000, 750, 500, 250])
    """Timesteps (out of 1000) visited per chunk, high to low (LongLive: [1000, 750, 500, 250])."""
    timestep_shift: float = 5.0
    """Shift applied to the timestep list (Wan's flow schedule)."""
    chunk_frames: int = 1
    """Latent frames generated per chunk."""
    num_chunks: int = 8
    """Chunks to generate."""
    window_frames: int = 4
    """Rolling attention window in latent frames, sinks included (LongLive v1: 12)."""
    sink_frames: int = 1
    """Global sink: the first latent frames of the video, kept for the whole stream (LongLive v1: 3)."""
    shot_sink_frames: int = 0
    """Shot sink: the first latent frames of the current shot (0 disables)."""
    height: int = 64
    """Output height in pixels."""
    width: int = 64
    """Output width in pixels."""
    fps: float = 8.0
    """Frames per second of the written video."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale s: v = v_neg + s * (v_prompt - v_neg) from one batched forward of 2x the
    batch (1 = off: no negative-prompt stream, half the KV-cache memory)."""
    negative_prompt: str = ""
    """Negative prompt of classifier-free guidance (used when guidance_scale != 1); empty = the empty string's
    embedding, as diffusers' Wan pipelines do."""
    scene_cut_prefix: str = "The scene transitions. "
    """Text put in front of the prompt of every shot after the first, for LongLive's case-folder prompts
    (per-shot caption JSON files); LongLive's DEFAULT_SCENE_CUT_PREFIX."""
    chunks_per_shot: int = 0
    """Case-folder prompts without shot_durations.txt: chunks per shot (0 = split infer.num_chunks evenly)."""
    seed: int = 0
    """Noise seed."""
    output: str = "outputs/video.mp4"
    """Where the mp4 goes."""
    vae_path: str = ""
    """Local VAE weights (diffusers directory or official Wan .pth); empty = the tiny random VAE (seed 0) that the
    synthetic data is encoded with."""
    text_encoder_path: str = ""
    """Local umT5 directory; empty = the tiny random text encoder (seed 0) that the synthetic data is encoded with."""
    recache_on_switch: bool = False
    """Recache the stored window's K/V under the new prompt at every prompt switch (LongLive's default), not only at
    scene cuts (new shots, which always recache); false keeps the old prompt's K/V in the window, for comparison."""
    chunk_step: str = "auto"
    """How the DiT runs a chunk pass: auto (compile+cuda_graph on CUDA, eager elsewhere), eager, compile, cuda_graph,
    compile+cuda_graph (inference/chunk_step.py; the first chunks, while the cache fills, always run eagerly)."""
    attention: str = "sdpa"
    """Self-attention over the KV window (issue 9): sdpa (the model's core: cuDNN on a GPU; the NVFP4 cache hands it
    dequantized K/V), fp8 (BF16 cache: q, K, V quantized to E4M3 per call, FP8 tensor-core Triton kernel;
    ~2-5% relative error per attention call), triton (the Triton kernel over the cache's own storage: BF16 K/V, or
    the packed NVFP4 pages fused), cudnn-fp8 (BF16 cache plus an E4M3 shadow written once per chunk, static q/K
    scales from the qk norms, cuDNN's FP8 flash attention; Hopper+ with nvidia-cudnn-frontend, an exact emulation
    on the CPU). fp8 and triton need CUDA (or TRITON_INTERPRET=1); cross-attention stays SDPA."""
    streaming_decode: bool = True
    """Decode each chunk as soon as it is generated (causal streaming VAE decoder, compiled + CUDA-graphed on a GPU)
    and append its frames to the mp4 while later chunks generate; false: decode the whole video at the end."""
    decode_mode: str = "auto"
    """Where streaming decode runs: auto (a side CUDA stream on a GPU, a worker thread on the CPU), stream, thread,
    sync (inline, in series with the DiT) or device (a dedicated GPU: decode_device)."""
    decode_device: str = ""
    """Decode GPU for decode_mode=device, e.g. "cuda:1" (the VAE is moved there)."""
    vae_conv: str = "bf16"
    """Number format of the streaming decoder's convs (issue 10): bf16 (the VAE's dtype) or fp8 (E4M3 Triton
    implicit-GEMM convs for the compute-bound 3x3x3 / 1x3x3 / 3x1x1 convs, per-call activation scales; needs sm89+
    CUDA; a few dB PSNR below bf16, quant/fp8_conv/README.md)."""

    def validate(self) -> None:
        if self.chunk_step not in ("auto", "eager", "compile", "cuda_graph", "compile+cuda_graph"):
            raise self.error("chunk_step", f"unknown mode {self.chunk_step!r}",
                             "use auto, eager, compile, cuda_graph or compile+cuda_graph")
        if self.attention not in ("sdpa", "fp8", "triton", "cudnn-fp8"):
            raise self.error("attention", f"unknown mode {self.attention!r}", "use sdpa, fp8, triton or cudnn-fp8")
        if self.decode_mode not in ("auto", "stream", "thread", "sync", "device"):
            raise self.error("decode_mode", f"unknown mode {self.decode_mode!r}", "use auto, stream, thread, sync or device")
        if self.vae_conv not in ("bf16", "fp8"):
            raise self.error("vae_conv", f"unknown format {self.vae_conv!r}", "use bf16 or fp8")
        if self.decode_mode == "device" and not self.decode_device:
            raise self.error("decode_device", "is empty but decode_mode=device", 'set infer.decode_device, e.g. "cuda:1"')
        if not self.denoising_steps:
            raise self.error("denoising_steps", "is empty", "give at least one timestep, e.g. [1000, 500]")
        if any(not 0 < t <= 1000 for t in self.denoising_steps):
            raise self.error("denoising_steps", f"{self.denoising_steps} has values outside (0, 1000]",
                             "use timesteps in (0, 1000]")
        for name in ("chunk_frames", "num_chunks", "window_frames"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set infer.{name} >= 1")
        if self.chunks_per_shot < 0:
            raise self.error("chunks_per_shot", f"must be >= 0, got {self.chunks_per_shot}",
                             "use 0 (split the video evenly over the shots) or a positive chunk count")
        if self.sink_frames + self.shot_sink_frames >= self.window_frames:
            raise self.error("window_frames", f"window_frames={self.window_frames} must exceed sink_frames + "
                             f"shot_sink_frames={self.sink_frames + self.shot_sink_frames}",
                             "enlarge infer.window_frames or shrink the sinks")
