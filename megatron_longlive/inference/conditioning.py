"""Seeds of a stream: an image (image-to-video) or a clip (video continuation) -> clean latents for chunk 0 on.

Inputs of another size are resized, keeping the aspect ratio, until they cover infer.height x infer.width
(bicubic, antialiased), then center-cropped to exactly that size - nothing is stretched or padded. The
Wan causal VAE encodes the first frame alone (1 image -> 1 latent frame) and then groups of 4, so a clip
keeps its first 1 + 4k frames (a warning says how many were dropped). The latents are handed to
`StreamingEngine.start_from_latents` (see engine.py): whole seeded chunks are cached as they are, chunk 0
in the global sink for the whole stream; a partial chunk is generated with its seeded frames held clean.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..models.wan.vae import WanVAE


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, h, w] floats -> [T, 3, height, width]: scale to cover (aspect kept), then crop the center."""
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    out = F.interpolate(frames, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return out[..., top:top + height, left:left + width]


def _to_video(frames_uint8: np.ndarray, height: int, width: int) -> torch.Tensor:
    """[T, h, w, 3] uint8 -> [1, 3, T, height, width] in [-1, 1]."""
    x = torch.from_numpy(np.array(frames_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = resize_center_crop(x, height, width).clamp(-1, 1)
    return x.permute(1, 0, 2, 3)[None]


def load_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """An image file -> [1, 3, 1, height, width] in [-1, 1] (resized and center-cropped, see module doc)."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: file not found. Fix: give the path of a PNG/JPEG/WebP image")
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e}). Fix: give a "
                         f"PNG/JPEG/WebP file") from None
    return _to_video(rgb[None], height, width)


def load_clip(path: str | os.PathLike, height: int, width: int, temporal_stride: int = 4,
              max_frames: int | None = None) -> torch.Tensor:
    """A video file -> its first 1 + stride*k frames [1, 3, T, height, width] in [-1, 1] (resized, cropped)."""
    from .video_writer import read_mp4

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--continue-from {path}: file not found. Fix: give the path of an mp4 clip")
    try:
        frames = read_mp4(path, max_frames)
    except Exception as e:  # PyAV raises its own error types for broken or non-video files
        raise ValueError(f"--continue-from {path}: cannot decode it as a video ({type(e).__name__}: {e})") from None
    if len(frames) == 0:
        raise ValueError(f"--continue-from {path}: the clip has no frames")
    keep = 1 + (len(frames) - 1) // temporal_stride * temporal_stride
    if keep < len(frames):
        warnings.warn(f"--continue-from {path}: using the first {keep} of {len(frames)} frames (the causal VAE "
                      f"takes 1 + {temporal_stride}k frames)")
    return _to_video(frames[:keep], height, width)


@torch.no_grad()
def encode_seed(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] in [-1, 1] -> normalized clean latents [B, C, 1 + (T-1)/4, H/s, W/s] (float32)."""
    return vae.encode(video.to(vae.device, vae.dtype)).float()


def load_seed(vae: WanVAE, height: int, width: int, image: str | None = None, clip: str | None = None) -> torch.Tensor:
    """`--image` or `--continue-from` -> seed latents [1, C, T, height/s, width/s] for `start_from_latents`."""
    if (image is None) == (clip is None):
        raise ValueError("give exactly one of --image PATH and --continue-from CLIP")
    video = (load_image(image, height, width) if image is not None
             else load_clip(clip, height, width, vae.temporal_stride))
    return encode_seed(vae, video)
