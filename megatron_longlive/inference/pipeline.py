"""Prompts -> mp4: load the DiT from a checkpoint, encode prompts, run the chunk loop, VAE-decode, write files.

Checkpoints accepted by `load_dit`: a training run directory (its `checkpoints/latest`), a `checkpoints/`
directory, one complete `step_*` DCP checkpoint (EMA weights preferred when it holds them), or a
`.safetensors` file of WanDiT weights (official Wan names). `None` keeps Wan's random init (seeded).
The VAE and text encoder come from `infer.vae_path` / `infer.text_encoder_path`; empty means the tiny
random ones (seed 0) that the synthetic training data is encoded with, so train and generate agree.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable

import torch

from ..config import RunConfig
from ..models.wan import WanDiT
from ..models.wan.text_encoder import TextEncoder
from ..models.wan.vae import WanVAE
from ..quant.providers import freeze_for_inference
from ..distributed.sp_inference import build_engine
from .engine import stream_latents
from .prompts import PromptSegment, check_schedule, prompt_changes
from .video_writer import write_mp4

ENCODER_SEED = 0


def load_encoders(cfg: RunConfig) -> tuple[WanVAE, TextEncoder]:
    """The VAE and text encoder of `cfg` (tiny random ones when no paths are set), checked against the DiT."""
    m, inf = cfg.model, cfg.infer
    vae = WanVAE.from_pretrained(inf.vae_path) if inf.vae_path else WanVAE.tiny(m.vae, seed=ENCODER_SEED)
    text = (TextEncoder.from_pretrained(inf.text_encoder_path, text_len=m.text_len) if inf.text_encoder_path
            else TextEncoder.tiny(text_dim=m.text_dim, text_len=m.text_len, seed=ENCODER_SEED))
    if vae.z_dim != m.in_channels:
        raise ValueError(f"infer.vae_path: the VAE has {vae.z_dim} latent channels but model.in_channels="
                         f"{m.in_channels}. Fix: use the VAE of model.vae={m.vae!r}")
    if text.text_dim != m.text_dim:
        raise ValueError(f"infer.text_encoder_path: the encoder outputs {text.text_dim} dims but model.text_dim="
                         f"{m.text_dim}. Fix: use the text encoder the model was trained with")
    return vae, text


def resolve_checkpoint(path: str) -> str:
    """A run dir / checkpoints dir / step dir / .safetensors file -> the file or complete step dir to load."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path}: not found. Fix: give a run directory, a step_* checkpoint "
                                f"directory or a .safetensors file")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"--checkpoint {path}: a file must be .safetensors WanDiT weights")
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            step = os.path.join(root, open(latest).read().strip())
            if os.path.isfile(os.path.join(step, "COMPLETE")):
                return step
    if os.path.isfile(os.path.join(path, "COMPLETE")):
        return path
    raise ValueError(f"--checkpoint {path}: no complete checkpoint there (no COMPLETE marker, no checkpoints/latest)"
                     f". Fix: point at a finished training run or a step_* directory")


def _load_dcp(model: WanDiT, path: str) -> str:
    """Load model weights from a DCP checkpoint; EMA weights replace the trained ones when present."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if any("lora" in k for k in keys):
        raise ValueError(f"{path}: a LoRA training checkpoint; generate loads full weights only for now. "
                         f"Fix: generate from a full fine-tune checkpoint or a merged .safetensors file")
    state = {"model": model.state_dict()}
    ema = {k: v for k, v in model.state_dict().items() if f"ema.{k}" in keys}
    if ema:
        state["ema"] = {k: v.clone() for k, v in ema.items()}
    with warnings.catch_warnings():  # single-process load: DCP warns that torch.distributed is not initialised
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    if ema:
        model.load_state_dict(state["ema"], strict=False)
    return "ema" if ema else "model"


def load_dit(cfg: RunConfig, checkpoint: str | None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> WanDiT:
    """The DiT of `cfg.model` with weights from `checkpoint` (see module docstring), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanDiT(cfg.model)
        model.init_weights()
    if checkpoint:
        path = resolve_checkpoint(checkpoint)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            missing, unexpected = model.load_state_dict(load_file(path), strict=False)
            if missing or unexpected:
                raise ValueError(f"{path}: weights do not match model.preset={cfg.model.preset!r} (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]}). Fix: use the matching --config")
        else:
            try:
                _load_dcp(model, path)
            except (RuntimeError, ValueError, KeyError) as e:
                if "LoRA" in str(e):
                    raise
                raise ValueError(f"{path}: cannot load into model.preset={cfg.model.preset!r} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}). Fix: use the config the checkpoint was "
                                 f"trained with (the run directory's config.yaml)") from e
    # quant.linear: W4A4 (nvfp4_emulated) or W8A8 (fp8) inference linears outside the high-precision keep-list.
    from ..quant.providers import convert_linears

    convert_linears(model, cfg.quant)
    return model.to(device=device, dtype=dtype).eval()


@dataclasses.dataclass
class GenerationResult:
    latents: torch.Tensor          # [B, C, T_latent, H, W]
    video: torch.Tensor | None     # [B, 3, T, H, W] in [-1, 1] (None when not decoded)
    video_path: str | None
    latents_path: str | None


def save_latents(path: str, latents: torch.Tensor, prompts: list[PromptSegment]) -> None:
    """`.safetensors` (tensor only) or `.pt` (tensor + prompt schedule)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"latents": latents.contiguous().cpu()}, path)
    elif path.endswith(".pt"):
        torch.save({"latents": latents.cpu(), "prompts": [dataclasses.asdict(s) for s in prompts]}, path)
    else:
        raise ValueError(f"--latents-out {path}: use a .pt or .safetensors file name")


def generate_video(cfg: RunConfig, model: WanDiT, segments: list[PromptSegment], out_path: str | None,
                   vae: WanVAE | None = None, text_encoder: TextEncoder | None = None,
                   latents_path: str | None = None, progress: bool = True,
                   seed_latents: torch.Tensor | None = None, sp_group=None,
                   live_prompts: Callable[[int], PromptSegment | None] | None = None) -> GenerationResult:
    """Run the chunk loop for cfg.infer.num_chunks chunks under the prompt schedule, decode, write mp4/latents.

    seed_latents [1, C, T, h, w] (an image's or a clip's, `conditioning.load_seed`): the video's first T latent
    frames, kept clean (image-to-video, continuation); they count toward infer.num_chunks and are in the output.
    sp_group: run the chunk loop sequence-parallel over this group (distributed/sp_inference.py); every rank
    gets the same latents, so only one rank should pass out_path / latents_path.
    live_prompts(c): a prompt switch decided while streaming (e.g. typed: `live_prompts.LivePrompts`), applied
    at chunk c like a scheduled one (new_shot = scene cut) and recorded with the latents."""
    inf = cfg.infer
    segments = check_schedule(segments, inf.num_chunks)
    if vae is None or text_encoder is None:
        vae, text_encoder = load_encoders(cfg)
    stride = vae.spatial_stride
    if inf.height % stride or inf.width % stride:
        raise ValueError(f"infer.height/width={inf.height}x{inf.width} must be multiples of the VAE stride {stride}")
    device = next(model.parameters()).device
    changes = prompt_changes(segments)
    # 1. text: one encoder pass per distinct prompt
    embeds = {p: text_encoder.encode([p]) for p in dict.fromkeys(changes.values())}
    freeze_for_inference(model)   # low-bit linears quantize their weights once (after any LoRA merge)
    engine = build_engine(model, inf, (inf.height // stride, inf.width // stride), sp_group, batch=1,
                          kv_cache=cfg.quant.kv_cache, step=inf.chunk_step if sp_group is None else "eager")
    if engine.guidance:          # classifier-free guidance: the negative prompt's stream
        engine.set_negative_prompt(text_encoder.encode([inf.negative_prompt]).to(device))
    if seed_latents is not None:
        if seed_latents.shape[2] >= inf.num_chunks * inf.chunk_frames:
            raise ValueError(f"the image/clip gives {seed_latents.shape[2]} latent frames, which fill all infer.num_chunks="
                             f"{inf.num_chunks} chunks of {inf.chunk_frames} frames: nothing is left to generate. Fix: "
                             f"raise infer.num_chunks or use a shorter clip")
        engine.start_from_latents(seed_latents)
    # 2. the chunk loop (segments marked new_shot, e.g. scene cuts of LongLive case folders, start shots)
    # 3. VAE decode and mp4: streamed (each chunk decoded and appended while later chunks generate) or at the end
    shots = {s.start_chunk for s in segments if s.new_shot}
    segments = list(segments)

    def prompt_for_chunk(c: int) -> torch.Tensor | None:
        live = live_prompts(c) if live_prompts is not None else None
        if live is not None:
            segments.append(live)
            if live.new_shot:
                shots.add(c)
            return text_encoder.encode([live.prompt]).to(device)
        return embeds[changes[c]].to(device) if c in changes else None

    chunk_iter = stream_latents(engine, inf.num_chunks, prompt_for_chunk, seed=inf.seed, progress=progress,
                                shot_starts=shots, recache_on_switch=inf.recache_on_switch)
    video = None
    if out_path and inf.streaming_decode:
        chunks, video = _generate_streaming_mp4(chunk_iter, vae, out_path, inf)
    else:
        chunks = list(chunk_iter)
    latents = torch.cat(chunks, dim=2).cpu()                              # [1, C, T, H, W]
    if latents_path:
        save_latents(latents_path, latents, sorted(segments, key=lambda s: s.start_chunk))
    if out_path and not inf.streaming_decode:
        if inf.vae_conv != "bf16":
            warnings.warn(f"infer.vae_conv={inf.vae_conv} is ignored with infer.streaming_decode=false (the "
                          f"whole-video decode is diffusers' own)", stacklevel=2)
        with torch.no_grad():
            video = vae.decode(latents.to(vae.device, vae.dtype)).float().clamp(-1, 1).cpu()  # [1, 3, T_px, H, W]
        write_mp4(out_path, video[0], inf.fps)
    return GenerationResult(latents, video, out_path, latents_path)


def _generate_streaming_mp4(chunk_iter, vae: WanVAE, out_path: str, inf) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the chunk loop while a worker decodes each chunk with the causal streaming decoder (== the full decode,
    tests/unit/test_vae_decoder.py) and appends its frames to the mp4 (inference/async_decode.py: bounded queues,
    in order, flushed on Ctrl-C). Returns the latent chunks and the decoded video [1, 3, T_px, H, W] float32."""
    from ..models.wan.vae_decoder import StreamingVAEDecoder
    from .async_decode import AsyncDecodeConfig, AsyncDecoder
    from .video_writer import Mp4Writer

    dec_device = torch.device(inf.decode_device) if inf.decode_mode == "device" else vae.device
    fast = dec_device.type == "cuda"
    decoder = StreamingVAEDecoder(vae, dec_device, vae.dtype, compile=fast, cuda_graph=fast,
                                  conv_precision=inf.vae_conv)
    writer = Mp4Writer(out_path, inf.fps)
    frames: list[torch.Tensor] = []

    def sink(x: torch.Tensor) -> None:            # [1, 3, T, H, W] float32 in [-1, 1] on the CPU
        frames.append(x)
        writer.write(x[0])

    mode = inf.decode_mode if inf.decode_mode != "auto" else ("stream" if fast else "thread")
    cfg = AsyncDecodeConfig(mode=mode, device=inf.decode_device or None, output="float")
    chunks = []
    # no_grad, not inference_mode: the decode worker thread updates the decoder's caches in place
    with torch.no_grad(), AsyncDecoder(decoder.decode, sink, cfg, on_close=writer.close) as pipe:
        for chunk in chunk_iter:
            chunks.append(chunk)
            pipe.submit(chunk.to(dec_device, vae.dtype))
    return chunks, torch.cat(frames, dim=2)
