"""Load what the evaluator compares: decoded videos ([T, H, W, 3] uint8) and latent dumps ([T, C, h, w] float).

Videos are decoded with PyAV (any container/codec ffmpeg reads; mp4 from `longlive generate` in practice).
Latent dumps are `.pt` / `.pth` (a tensor, or a dict holding one under `latents` / `latent` / a single
tensor entry) or `.safetensors` (the `latents` entry, or the only entry), in the VAE's layout `[C, T, h, w]`
or `[1, C, T, h, w]`; they are returned frame-major `[T, C, h, w]` float32 so per-frame metrics can index
time first. Every failure names the file and says what was expected.
"""
from __future__ import annotations

import os

import av
import numpy as np
import torch

LATENT_SUFFIXES = (".pt", ".pth", ".safetensors")
LATENT_KEYS = ("latents", "latent", "x0", "video_latents")


def is_latent_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(LATENT_SUFFIXES)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode every frame (the first `max_frames` when given) -> [T, H, W, 3] uint8 RGB."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video file not found")
    frames: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: the file has no video stream")
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable video ({type(e).__name__}: {e}). Fix: pass an mp4 written by "
                         "`longlive generate` or any file ffmpeg can decode") from e
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames)


def to_float(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 -> float32 in [0, 1] (float input is passed through as float32)."""
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return frames.astype(np.float32, copy=False)


def luminance(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] in [0, 1] -> [T, H, W] Rec.601 luma (what OpenCV's RGB2GRAY computes)."""
    return frames[..., 0] * 0.299 + frames[..., 1] * 0.587 + frames[..., 2] * 0.114


def _pick_tensor(path: str, entries: dict) -> torch.Tensor:
    tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
    for key in LATENT_KEYS:
        if key in tensors:
            return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: cannot tell which entry holds the latents (found {sorted(tensors)}). Fix: save "
                     f"the latents under one of the keys {LATENT_KEYS}, or save a single tensor")


def read_latents(path: str | os.PathLike, layout: str = "CTHW") -> torch.Tensor:
    """Load a latent dump -> [T, C, h, w] float32. `layout` is the stored order without batch: CTHW or TCHW."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: latent file not found")
    if layout not in ("CTHW", "TCHW"):
        raise ValueError(f"latent layout {layout!r} is not supported; use CTHW (the VAE's) or TCHW")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            latents = _pick_tensor(path, load_file(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            latents = obj if isinstance(obj, torch.Tensor) else _pick_tensor(path, dict(obj))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many types for a corrupt file
        raise ValueError(f"{path}: not a readable latent dump ({type(e).__name__}: {e}). Fix: save a tensor with "
                         "torch.save or safetensors") from e
    if latents.ndim == 5:
        if latents.shape[0] != 1:
            raise ValueError(f"{path}: batched latents {tuple(latents.shape)}; save one video (batch 1) per file")
        latents = latents[0]
    if latents.ndim != 4:
        raise ValueError(f"{path}: latents must be 4-D {layout} (or 5-D with batch 1), got {tuple(latents.shape)}")
    if layout == "CTHW":
        latents = latents.permute(1, 0, 2, 3)
    return latents.float().contiguous()
