"""NVIDIA DALI decoding backend (GPU NVDEC: H.264, HEVC, AV1, VP9, ...), same contract as `PyAVDecoder`.

DALI decodes the whole stream on the GPU (`fn.decoders.video`, or `fn.experimental.decoders.video` on
older DALI, device "mixed"); the container checks, the presentation timestamps and therefore the frame
choice at the target fps come from a packet-only PyAV pass (no decoding), so both backends pick the same
source frames, and `resize_center_crop` runs on the GPU tensors. The two backends then differ only in
the YUV->RGB conversion of the decoder (measured tolerance in tests/gpu/test_data_dali.py).
`nvidia-dali` is optional: importing this module works without it; building a decoder raises a clear
ImportError naming the package to install.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .decode import (DecodedVideo, PyAVDecoder, VideoRejected, _notes, choose_bucket, glitch_frames,
                     resize_center_crop, sample_indices)

INSTALL_HINT = ("the DALI backend needs NVIDIA DALI and a CUDA GPU. Fix: pip install nvidia-dali-cuda120 "
                "(match your CUDA major version), or use data.decoder=pyav")


def dali_available() -> bool:
    """True when nvidia.dali imports and CUDA is present."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _video_op():
    from nvidia.dali import fn

    op = getattr(getattr(fn, "decoders", None), "video", None)
    return op or fn.experimental.decoders.video


def _thumbnails(frames: torch.Tensor, side: int = 16) -> np.ndarray:
    """GPU version of `decode.thumbnail` for `[N, H, W, 3]` uint8: luma block means `[N, h, w]`."""
    f = frames.float()
    y = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114  # [N, H, W]
    fh, fw = max(1, y.shape[1] // side), max(1, y.shape[2] // side)
    h, w = y.shape[1] // fh, y.shape[2] // fw
    return y[:, :h * fh, :w * fw].reshape(-1, h, fh, w, fw).mean((2, 4)).cpu().numpy()


class DALIDecoder:
    """GPU decoding through DALI; one small pipeline per decoder object, fed file bytes one video at a time."""

    name = "dali"

    def __init__(self, min_side: int = 16, device_id: int | None = None, truncation_tolerance: float = 0.9):
        try:
            from nvidia.dali import fn, pipeline_def, types
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        if not torch.cuda.is_available():
            raise ImportError(INSTALL_HINT + " (no CUDA device visible)")
        self.device_id = torch.cuda.current_device() if device_id is None else device_id
        self.probe = PyAVDecoder(min_side=min_side, truncation_tolerance=truncation_tolerance)
        self.truncation_tolerance = truncation_tolerance
        video_op = _video_op()

        @pipeline_def(batch_size=1, num_threads=2, device_id=self.device_id, prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return video_op(encoded, device="mixed")

        self.pipe = pipe()
        self.pipe.build()

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
        bucket = choose_bucket(info.height, info.width, buckets)
        with open(path, "rb") as fh:
            data = np.frombuffer(fh.read(), dtype=np.uint8)
        try:
            self.pipe.feed_input("encoded", [data])
            (out,) = self.pipe.run()
        except RuntimeError as e:
            raise VideoRejected(path, "decode_error", f"DALI: {str(e).splitlines()[0]}") from None
        try:  # zero-copy view of DALI's GPU buffer, cloned because DALI reuses it on the next run
            frames = torch.from_dlpack(out.as_tensor()).clone()
        except (TypeError, AttributeError, RuntimeError):
            frames = torch.from_numpy(out.as_cpu().as_array()).to(f"cuda:{self.device_id}")
        frames = frames.reshape(-1, *frames.shape[-3:])  # [N, H, W, 3] uint8 (GPU)
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
