"""NVIDIA DALI decoding backend, same contract as `PyAVDecoder`: GPU (NVDEC) or DALI's CPU decoder.

DALI decodes the whole stream (`fn.decoders.video`, or `fn.experimental.decoders.video` on older DALI):
device="gpu" runs NVDEC (operator device "mixed": H.264, HEVC, AV1, VP9, ...); device="cpu" runs DALI's
CPU decoder, which reads only VP8, VP9 and MJPEG (other codecs raise `UnsupportedCodec` naming the fix).
The container checks, the presentation timestamps and therefore the frame choice at the target fps come
from a packet-only PyAV pass (no decoding), so both backends pick the same source frames, and
`resize_center_crop` runs on the decoded tensors (on the GPU for device="gpu"). The backends then differ
only in the decoder's YUV->RGB conversion (measured tolerances: tests/gpu/test_data_dali.py for the GPU,
tests/unit/test_data_dali_cpu.py for the CPU). `nvidia-dali` is optional: importing this module works
without it; building a decoder raises a clear ImportError naming the package to install.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import numpy as np
import torch

from .decode import (DecodedVideo, PyAVDecoder, VideoRejected, _notes, choose_bucket, glitch_frames,
                     resize_center_crop, sample_indices, thumbnail)

INSTALL_HINT = ("the DALI backend needs NVIDIA DALI (and a CUDA GPU for device='gpu'). Fix: pip install "
                "nvidia-dali-cuda120 (match your CUDA major version), or use data.decoder=pyav")
CPU_CODECS = ("vp8", "vp9", "mjpeg")
"""Codecs DALI's CPU video decoder reads (FFmpeg codec names); everything else needs NVDEC or PyAV."""


class UnsupportedCodec(ValueError):
    """A codec the chosen DALI device cannot decode: a configuration error, not a bad file."""

    def __init__(self, path: str, codec: str):
        self.path, self.codec = str(path), codec
        super().__init__(f"{path}: codec {codec!r} is not supported by DALI's CPU video decoder (it reads "
                         f"{', '.join(CPU_CODECS)}). Fix: data.decoder=dali (GPU, NVDEC) or data.decoder=pyav")


# What DALI says when NVDEC on this GPU cannot take the stream (the codec, e.g. AV1 on Hopper: "Codec av1 is not
# supported by NVDEC on this platform", or a frame below NVDEC's minimum size, 144x144 for HEVC): a property of the
# hardware, not of the file, so the DALI GPU decoder hands such files to PyAV (cpu_fallback) instead of rejecting.
NVDEC_LIMITS = ("Failed to create video decoder", "Video is too small")


def is_nvdec_limit(dali_message: str) -> bool:
    """True when DALI's error says NVDEC on this GPU cannot take the stream (not that the file is bad)."""
    return any(m in dali_message for m in NVDEC_LIMITS)


class NvdecCannotDecode(RuntimeError):
    """NVDEC on this GPU cannot decode the stream (codec or size); `detail` is DALI's message."""

    def __init__(self, path: str, codec: str, detail: str):
        self.path, self.codec, self.detail = str(path), codec, detail
        super().__init__(f"{path}: NVDEC on this GPU cannot decode this {codec} stream (DALI: {detail}). Fix: "
                         "DALIDecoder(cpu_fallback=True) (the default) or data.decoder=pyav")


def dali_available(device: str = "gpu") -> bool:
    """True when nvidia.dali imports (and, for device="gpu", CUDA is present)."""
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return False
    return device == "cpu" or torch.cuda.is_available()


def _video_op():
    from nvidia.dali import fn

    op = getattr(getattr(fn, "decoders", None), "video", None)
    return op or fn.experimental.decoders.video


def _dali_error(e: Exception) -> str:
    """The operator's own message from DALI's "Critical error in pipeline: ... encountered: <msg>" text."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else []
    return (after or lines or [type(e).__name__])[0]


def _thumbnails(frames: torch.Tensor, side: int = 16) -> np.ndarray:
    """`decode.thumbnail` of each `[N, H, W, 3]` uint8 frame: luma block means `[N, h, w]`.

    On the CPU the NumPy reference itself (the fastest there, ~2x the batched torch form at 480x832);
    on the GPU the batched form below.
    """
    if frames.device.type == "cpu":
        return np.stack([thumbnail(f, side) for f in frames.numpy()])
    return _thumbnails_torch(frames, side)


def _thumbnails_torch(frames: torch.Tensor, side: int = 16) -> np.ndarray:
    """Batched torch version of `decode.thumbnail` for `[N, H, W, 3]` uint8 (GPU)."""
    f = frames.float()
    y = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114  # [N, H, W]
    fh, fw = max(1, y.shape[1] // side), max(1, y.shape[2] // side)
    h, w = y.shape[1] // fh, y.shape[2] // fw
    return y[:, :h * fh, :w * fw].reshape(-1, h, fh, w, fw).mean((2, 4)).cpu().numpy()


class DALIDecoder:
    """Decoding through DALI; one small pipeline per decoder object, fed file bytes one video at a time.

    device: "gpu" (NVDEC, DALI operator device "mixed"; needs CUDA) or "cpu" (DALI's CPU decoder:
    VP8, VP9 and MJPEG only; needs no GPU). device_id picks the GPU (default: the current one).
    cpu_fallback: files the decoder cannot take are decoded by PyAV instead, with a `pyav_fallback` note on the
    result - on the GPU the streams NVDEC cannot take (NVDEC_LIMITS), on the CPU codecs outside CPU_CODECS.
    None (default): on for the GPU (a hardware limit met file by file), off for the CPU (choosing DALI's CPU
    decoder for H.264 is a configuration error: UnsupportedCodec); False on the GPU raises NvdecCannotDecode.
    """

    def __init__(self, min_side: int = 16, device_id: int | None = None, truncation_tolerance: float = 0.9,
                 device: str = "gpu", cpu_fallback: bool | None = None):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DALIDecoder device={device!r}. Fix: use 'gpu' (NVDEC) or 'cpu' (VP8/VP9/MJPEG only)")
        try:
            from nvidia.dali import fn, pipeline_def, types
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        if device == "gpu" and not torch.cuda.is_available():
            raise ImportError(INSTALL_HINT + " (no CUDA device visible; DALI's CPU decoder: data.decoder=dali-cpu)")
        self.device, self.name = device, "dali" if device == "gpu" else "dali-cpu"
        self.device_id = None if device == "cpu" else torch.cuda.current_device() if device_id is None else device_id
        self.probe = PyAVDecoder(min_side=min_side, truncation_tolerance=truncation_tolerance)
        self.truncation_tolerance = truncation_tolerance
        self.cpu_fallback = device == "gpu" if cpu_fallback is None else cpu_fallback
        video_op = _video_op()
        op_device = "mixed" if device == "gpu" else "cpu"

        @pipeline_def(batch_size=1, num_threads=2, device_id=self.device_id, prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return video_op(encoded, device=op_device)

        self._new_pipe = pipe
        self.pipe = self._build()

    def _build(self):
        p = self._new_pipe()
        p.build()
        return p

    def _source_times(self, path: str) -> tuple[np.ndarray, object]:
        """Presentation times of every frame (sorted packet pts) and the VideoInfo, from a packet-only pass."""
        container, stream, info = self.probe.probe(path)
        with container:
            pts = [float(p.pts * p.time_base) for p in container.demux(stream) if p.size and p.pts is not None]
        if not pts:
            raise VideoRejected(path, "no_frames")
        t = np.sort(np.asarray(pts))
        return t - t[0], info

    def decode(self, path: str, fps: float, buckets: Sequence[tuple[int, int]], start_s: float = 0.0,
               max_frames: int | None = None) -> DecodedVideo:
        source_times, info = self._source_times(path)
        if self.device == "cpu" and info.codec not in CPU_CODECS:
            if not self.cpu_fallback:
                raise UnsupportedCodec(path, info.codec)
            return self._pyav(path, fps, buckets, start_s, max_frames,
                              f"DALI's CPU decoder reads {', '.join(CPU_CODECS)}, not {info.codec}")
        bucket = choose_bucket(info.height, info.width, buckets)
        try:
            frames = self._decode_all(path)  # [N, H, W, 3] uint8 (on the GPU for device="gpu")
        except NvdecCannotDecode as e:
            if not self.cpu_fallback:
                raise NvdecCannotDecode(path, info.codec, e.detail) from None
            return self._pyav(path, fps, buckets, start_s, max_frames,
                              f"NVDEC cannot decode this {info.codec} stream ({e.detail})")
        if frames.shape[0] > source_times.size:  # e.g. AVI's empty "repeat" packets decoded as frames
            raise VideoRejected(path, "decode_error", f"DALI decoded {frames.shape[0]} frames from "
                                f"{source_times.size} non-empty packets: the frame times are unknown")
        n = min(frames.shape[0], source_times.size)
        if n < source_times.size and max_frames is None:
            raise VideoRejected(path, "corrupt_frame", f"DALI decoded {frames.shape[0]} of {source_times.size} frames")
        source_times = source_times[:n]
        step = float(np.median(np.diff(source_times))) if n > 1 else 0.0
        if info.duration_s > 0 and source_times[-1] + step < self.truncation_tolerance * info.duration_s:
            raise VideoRejected(path, "truncated", f"decoded {source_times[-1] + step:.2f}s of {info.duration_s:.2f}s")
        thumbs = _thumbnails(frames[:n])
        bad = glitch_frames(thumbs)
        if bad:
            raise VideoRejected(path, "corrupt_frame", f"source frame(s) {bad[:5]} differ from both neighbours")
        target_times, idx = sample_indices(source_times, fps, start_s, max_frames=max_frames)
        if idx.size == 0:
            raise VideoRejected(path, "no_frames", f"no frame at or after {start_s}s")
        picked = frames[torch.as_tensor(idx, device=frames.device)]
        out_frames = resize_center_crop(picked, bucket).cpu().numpy()
        return DecodedVideo(frames=out_frames, times=target_times, source_index=idx, source_times=source_times,
                            fps=fps, info=info, notes=_notes(info, source_times))

    def _pyav(self, path, fps, buckets, start_s, max_frames, why: str) -> DecodedVideo:
        """The file decoded by PyAV (the same frame choice and crop), noted as a fallback."""
        out = self.probe.decode(path, fps, buckets, start_s, max_frames)
        out.notes.append(("pyav_fallback", why))
        return out

    def _decode_all(self, path: str) -> torch.Tensor:
        """Every frame of the file's first video stream, `[N, H, W, 3]` uint8 RGB, through the DALI pipeline."""
        with open(path, "rb") as fh:
            data = np.frombuffer(fh.read(), dtype=np.uint8)
        try:
            self.pipe.feed_input("encoded", [data])
            (out,) = self.pipe.run()
        except RuntimeError as e:
            self.pipe = self._build()  # DALI declares the pipeline invalid after a failed run
            detail = _dali_error(e)
            if self.device == "gpu" and is_nvdec_limit(detail):
                raise NvdecCannotDecode(path, "?", detail) from None
            raise VideoRejected(path, "decode_error", f"DALI: {detail}") from None
        if self.device == "cpu":  # as_array() copies out of DALI's buffers, which the next run reuses
            frames = torch.from_numpy(out.as_array())
        else:
            try:  # zero-copy view of DALI's GPU buffer, cloned because DALI reuses it on the next run
                frames = torch.from_dlpack(out.as_tensor()).clone()
            except (TypeError, AttributeError, RuntimeError):
                frames = torch.from_numpy(out.as_cpu().as_array()).to(f"cuda:{self.device_id}")
        return frames.reshape(-1, *frames.shape[-3:])
