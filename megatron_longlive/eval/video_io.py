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


def parse_shots(spec: str | None, video_path: str | os.PathLike | None = None) -> list[int] | None:
    """Shot start frames from `--shots`: "0,17,33" or a JSON / JSONL file.

    A file holds either a list of start frames, {"shots": [{"start_frame": ...}, ...]}, or JSONL lines of that
    form with a "path" (the synthetic-data manifest); a manifest line is matched to the video by file name."""
    if spec is None:
        return None
    if not os.path.exists(spec):
        try:
            return sorted({int(s) for s in spec.split(",") if s.strip()})
        except ValueError:
            raise ValueError(f"--shots {spec!r}: give comma-separated start frames (e.g. 0,17,33) or a JSON/JSONL "
                             "file; no such file either") from None
    import json

    with open(spec) as f:
        text = f.read()
    try:
        entries = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec}: neither JSON nor JSONL ({e})") from e
    if len(entries) == 1 and isinstance(entries[0], list) and all(isinstance(s, int) for s in entries[0]):
        return sorted(set(entries[0]))
    if len(entries) > 1 or (entries and "path" in entries[0]):
        name = os.path.basename(os.fspath(video_path)) if video_path is not None else None
        matches = [e for e in entries if name is not None and os.path.basename(e.get("path", "")) == name]
        if not matches:
            raise ValueError(f"{spec}: no manifest line has path ending in {name!r}. Fix: evaluate videos listed "
                             "in the manifest, or give start frames as 0,17,33")
        entries = matches[:1]
    try:
        return sorted({int(s["start_frame"]) for s in entries[0]["shots"]})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{spec}: expected a list of start frames or {{\"shots\": [{{\"start_frame\": N}}, ...]}}"
                         ) from e
