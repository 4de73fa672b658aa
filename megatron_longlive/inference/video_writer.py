"""Write videos as real mp4 files through PyAV, frame by frame (so long streams are written as they grow).

`Mp4Writer` opens the container once and accepts uint8 frames [T, H, W, 3] or float videos in [-1, 1]
([3, T, H, W], the layout of the VAE's output) in any number of calls; `close()` flushes the encoder.
The codec is the first of libx264 / h264 / mpeg4 that this PyAV build can encode, pixel format yuv420p
(so even width and height are required).
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import torch

CODEC_PREFERENCE = ("libx264", "h264", "mpeg4")


def pick_codec() -> str:
    """The first mp4 video encoder available in this PyAV build."""
    for name in CODEC_PREFERENCE:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises several error types for a missing encoder
            continue
    raise RuntimeError(f"PyAV has none of the encoders {CODEC_PREFERENCE}; install a PyAV wheel with ffmpeg codecs")


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, T, H, W] float in [-1, 1] (torch) or [T, H, W, 3] uint8 (numpy) -> [T, H, W, 3] uint8."""
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"numpy frames must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
        return video
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video tensor must be [3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class Mp4Writer:
    """Incremental mp4 writer. Use as a context manager or call `close()`."""

    def __init__(self, path: str | os.PathLike, fps: float, codec: str | None = None, crf: int = 12):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.fps = fps
        self.codec = codec or pick_codec()
        self.crf = crf
        self.num_frames = 0
        self._container = av.open(self.path, mode="w")
        self._stream = None

    def _open_stream(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"{self.path}: yuv420p needs even frame sizes, got {height}x{width}")
        rate = Fraction(self.fps).limit_denominator(1001)
        stream = self._container.add_stream(self.codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        if self.codec in ("libx264", "h264"):
            stream.options = {"crf": str(self.crf), "preset": "medium"}
        else:
            stream.bit_rate = 8_000_000
        stream.thread_count = 1  # deterministic output
        self._stream = stream

    def write(self, video: torch.Tensor | np.ndarray) -> None:
        """Append frames: [T, H, W, 3] uint8 or [3, T, H, W] in [-1, 1]."""
        frames = to_uint8_frames(video)
        if self._stream is None:
            self._open_stream(frames.shape[1], frames.shape[2])
        elif (frames.shape[1], frames.shape[2]) != (self._stream.height, self._stream.width):
            raise ValueError(f"{self.path}: frame size changed from {self._stream.height}x{self._stream.width} "
                             f"to {frames.shape[1]}x{frames.shape[2]}")
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
        self.num_frames += len(frames)

    def close(self) -> None:
        if self._container is None:
            return
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mp4(path: str | os.PathLike, video: torch.Tensor | np.ndarray, fps: float) -> str:
    """Write a whole video in one call; returns the path."""
    with Mp4Writer(path, fps) as writer:
        writer.write(video)
    return os.fspath(path)


def read_mp4(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode the frames of a video file (the first `max_frames` when given) -> [T, H, W, 3] uint8."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: video file not found")
    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) == max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames)
