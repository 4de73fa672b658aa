"""Video decoding: one decoder interface, the PyAV (CPU, everything FFmpeg reads) backend, and shared helpers.

A decoder turns a file into `DecodedVideo`: RGB uint8 frames `[T, h, w, 3]` sampled at a target fps and
resized + center-cropped to a resolution bucket. Sampling uses presentation timestamps, so variable frame
rate sources come out at the right times: output frame k shows the source frame on screen at
`start + k / fps` (the last frame whose pts <= that time). Files that cannot become training clips raise
`VideoRejected` with a named `reason` (see `REASONS`); harmless peculiarities (10-bit, VFR) are kept as
`notes` on the result. The DALI backend (`decode_dali.py`, GPU NVDEC or DALI's CPU decoder) returns the
same type through the same `resize_center_crop`, so the backends differ only in their YUV->RGB conversion.
"""
from __future__ import annotations

import dataclasses
import fractions
import os
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Every reason a file can be rejected at decode time (the preprocess report uses these names).
REASONS = {
    "missing_file": "the path does not exist",
    "empty_file": "the file has zero bytes",
    "not_a_video": "FFmpeg recognises no media container in the file",
    "truncated": "the container is cut short (declared sizes/duration exceed what the file holds)",
    "unreadable_container": "a media container FFmpeg cannot open",
    "no_video_stream": "the container holds no video stream (e.g. audio only)",
    "resolution_too_small": "width or height is below the minimum source side",
    "corrupt_frame": "the decoder reported corrupt data, or a garbage frame unlike both neighbours",
    "decode_error": "the decoder failed for another reason",
    "no_frames": "the video stream yields no frames",
}
# Notes: accepted inputs that needed care.
NOTES = {
    "high_bit_depth": "more than 8 bits per sample; converted to 8-bit RGB",
    "variable_frame_rate": "irregular timestamps; frames sampled by pts",
    "timestamp_gap": "a pts step over 4x the median (dropped or missing packets); the previous frame is held",
    "pyav_fallback": "the DALI decoder handed the file to PyAV: it cannot decode this stream (codec or size)",
}


class VideoRejected(ValueError):
    """A file that cannot become a training clip; `reason` is a key of `REASONS`."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}: {detail or REASONS[reason]}")


@dataclasses.dataclass
class VideoInfo:
    """What the container says about the video stream."""

    path: str
    container: str
    codec: str
    width: int
    height: int
    pix_fmt: str
    bit_depth: int
    fps: float
    """Average frame rate declared by the container (0 when unknown)."""
    duration_s: float
    """Declared duration (0 when unknown)."""


@dataclasses.dataclass
class DecodedVideo:
    """Frames sampled at `fps` and cropped to a bucket, with the source timestamps behind them."""

    frames: np.ndarray  # [T, h, w, 3] uint8 RGB
    times: np.ndarray  # [T] float64, target time of each output frame (start + k / fps)
    source_index: np.ndarray  # [T] int64, index of the source frame shown at each output time
    source_times: np.ndarray  # [N] float64, pts (seconds) of every decoded source frame
    fps: float
    info: VideoInfo
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


class VideoDecoder(Protocol):
    """A decoding backend: `decode(path, fps, bucket)` -> `DecodedVideo` or raises `VideoRejected`."""

    name: str

    def decode(self, path: str, fps: float, buckets: Sequence[tuple[int, int]], start_s: float = 0.0,
               max_frames: int | None = None) -> DecodedVideo: ...


# ----------------------------------------------------------------------------------------------------------
# Shared helpers (both backends)

def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket `(h, w)` whose aspect ratio is closest to the source's (log-ratio distance; ties: larger)."""
    if not buckets:
        raise ValueError("resolution buckets: empty list. Fix: pass at least one (height, width) bucket")
    src = np.log(width / height)
    return min(buckets, key=lambda b: (abs(np.log(b[1] / b[0]) - src), -b[0] * b[1]))


def resize_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale `[T, H, W, 3]` uint8 frames to cover `size` (antialiased bilinear), then center-crop to it."""
    h, w = size
    t, src_h, src_w, _ = frames.shape
    if (src_h, src_w) == (h, w):
        return frames
    scale = max(h / src_h, w / src_w)
    rh, rw = max(h, round(src_h * scale)), max(w, round(src_w * scale))
    x = frames.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    if (rh, rw) != (src_h, src_w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - h) // 2, (rw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def sample_indices(source_times: np.ndarray, fps: float, start_s: float = 0.0, end_s: float | None = None,
                   max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which source frame is on screen at each target time `start_s + k / fps` (pts-based, VFR-safe).

    The last source frame is shown for one typical frame interval (median pts step). Returns
    (target times [T], source indices [T]).
    """
    st = np.asarray(source_times, dtype=np.float64)
    if st.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    step = float(np.median(np.diff(st))) if st.size > 1 else 1.0 / fps
    stop = st[-1] + step if end_s is None else min(end_s, st[-1] + step)
    n = int(np.floor((stop - start_s) * fps - 1e-9)) + 1 if stop > start_s else 0
    if max_frames is not None:
        n = min(n, max_frames)
    times = start_s + np.arange(max(n, 0)) / fps
    idx = np.searchsorted(st, times + 1e-9, side="right") - 1
    keep = idx >= 0  # target times before the first frame are dropped
    return times[keep], idx[keep].astype(np.int64)


def thumbnail(rgb: np.ndarray, side: int = 16) -> np.ndarray:
    """Luma of an RGB uint8 frame `[H, W, 3]`, block-averaged to about `side` x `side` (float32)."""
    y = rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    fh, fw = max(1, y.shape[0] // side), max(1, y.shape[1] // side)
    h, w = y.shape[0] // fh, y.shape[1] // fw
    return y[:h * fh, :w * fw].reshape(h, fh, w, fw).mean((1, 3))


def glitch_frames(thumbs: np.ndarray, ratio: float = 4.0, floor: float = 4.0) -> list[int]:
    """Source frames unlike both neighbours while the neighbours agree: silent corruption / garbage frames.

    Frame i is flagged when its changes from frames i-1 and i+1 both exceed `ratio` x the median change
    (at least `floor` luma levels) and frames i-1 and i+1 differ by under half of that.
    """
    if len(thumbs) < 3:
        return []
    t = np.asarray(thumbs, dtype=np.float32)
    d = np.abs(np.diff(t, axis=0)).mean((1, 2))  # [N-1]
    skip = np.abs(t[2:] - t[:-2]).mean((1, 2))  # [N-2]
    g = max(floor, ratio * float(np.median(d)))
    both = np.minimum(d[:-1], d[1:])  # change into and out of frame i (i = 1..N-2)
    return [int(i) + 1 for i in np.flatnonzero((both > g) & (skip < 0.5 * both))]


def is_variable_frame_rate(source_times: np.ndarray, tol: float = 0.05) -> bool:
    """True when pts steps vary by more than `tol` of their median."""
    d = np.diff(np.asarray(source_times, dtype=np.float64))
    if d.size < 2:
        return False
    med = float(np.median(d))
    return med <= 0 or float(np.max(np.abs(d - med))) > tol * med


# codecs whose streams legitimately carry packets without a picture (packed B-frames' N-VOP placeholders)
_PLACEHOLDER_CODECS = {"mpeg4", "msmpeg4v2", "msmpeg4v3", "h263"}
_MAGIC = (b"\x1aE\xdf\xa3", b"RIFF", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")


def _isobmff_truncated(data_len: int, fh) -> bool | None:
    """Walk top-level ISO-BMFF boxes: True if a box claims bytes past the end, None if not ISO-BMFF."""
    fh.seek(0)
    head = fh.read(12)
    if len(head) < 8 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return None
    pos = 0
    has_moov = False
    while pos + 8 <= data_len:
        fh.seek(pos)
        hdr = fh.read(16)
        size = int.from_bytes(hdr[:4], "big")
        kind = hdr[4:8]
        if size == 1 and len(hdr) >= 16:
            size = int.from_bytes(hdr[8:16], "big")
        if size == 0:  # box runs to end of file
            return kind != b"moov" and not has_moov
        if size < 8:
            return False
        has_moov |= kind == b"moov"
        if pos + size > data_len:
            return True
        pos += size
    return not has_moov


def classify_unopenable(path: str, error: Exception) -> VideoRejected:
    """Name why FFmpeg could not open `path`: truncated container, unknown container, or another failure."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        truncated = _isobmff_truncated(size, fh)
        fh.seek(0)
        head = fh.read(16)
    if truncated:
        return VideoRejected(path, "truncated", f"ISO-BMFF boxes extend past the file's {size} bytes ({error})")
    if truncated is None and not any(head.startswith(m) for m in _MAGIC) and b"\x47" != head[:1]:
        return VideoRejected(path, "not_a_video", f"no known container signature; FFmpeg: {error}")
    return VideoRejected(path, "unreadable_container", str(error))


def check_file(path: str) -> None:
    """Reject missing and zero-byte files before handing them to a decoder."""
    if not os.path.exists(path):
        raise VideoRejected(path, "missing_file")
    if os.path.getsize(path) == 0:
        raise VideoRejected(path, "empty_file")


# ----------------------------------------------------------------------------------------------------------
# PyAV backend

class PyAVDecoder:
    """CPU decoding through PyAV/FFmpeg; frames converted to RGB by swscale, resized by `resize_center_crop`."""

    name = "pyav"

    def __init__(self, min_side: int = 16, truncation_tolerance: float = 0.9, threads: int = 0, strict: bool = True):
        self.min_side, self.strict = min_side, strict
        self.truncation_tolerance = truncation_tolerance
        self.threads = threads

    def probe(self, path: str):
        """Open `path` and return (container, video stream, VideoInfo); raises `VideoRejected`."""
        import av

        check_file(path)
        try:
            container = av.open(path)
        except av.FFmpegError as e:
            raise classify_unopenable(path, e) from None
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            container.close()
            raise VideoRejected(path, "no_video_stream", f"streams present: {kinds}")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if self.strict:  # decoders raise on the errors they detect instead of concealing them
            cc.options = {**cc.options, "err_detect": "crccheck+explode"}
        pix = stream.format.name if stream.format is not None else (cc.pix_fmt or "unknown")
        bits = max((c.bits for c in stream.format.components), default=8) if stream.format is not None else 8
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / 1e6 if container.duration else 0.0)
        info = VideoInfo(path=str(path), container=container.format.name, codec=cc.name, width=cc.width,
                         height=cc.height, pix_fmt=pix, bit_depth=int(bits),
                         fps=float(stream.average_rate) if stream.average_rate else 0.0, duration_s=duration)
        if min(info.width, info.height) < self.min_side:
            container.close()
            raise VideoRejected(path, "resolution_too_small",
                                f"{info.width}x{info.height} < minimum side {self.min_side}")
        return container, stream, info

    def decode(self, path: str, fps: float, buckets: Sequence[tuple[int, int]], start_s: float = 0.0,
               max_frames: int | None = None) -> DecodedVideo:
        import av

        container, stream, info = self.probe(path)
        if self.threads:
            stream.thread_count = self.threads
        bucket = choose_bucket(info.height, info.width, buckets)
        # Stream through the source, keeping only frames some target time will show (pts-based).
        times: list[float] = []
        thumbs: list[np.ndarray] = []
        counts = {"packets": 0, "frames": 0}
        kept: dict[int, torch.Tensor] = {}
        next_target = start_s
        prev: tuple[float, np.ndarray] | None = None
        t0 = None
        try:
            with container:
                for frame in self._frames(container, stream, counts):
                    if frame.pts is None:
                        continue
                    if getattr(frame, "is_corrupt", False):
                        raise VideoRejected(path, "corrupt_frame", f"frame at pts {float(frame.pts * frame.time_base):.3f}s")
                    t = float(frame.pts * frame.time_base)
                    t0 = t if t0 is None else t0
                    t -= t0  # times relative to the first frame
                    if times and t <= times[-1]:
                        continue  # duplicate / non-monotonic pts: keep the first
                    # the previous frame is on screen for targets in [t_prev, t)
                    if prev is not None and next_target < t:
                        kept[len(times) - 1] = self._resize(prev[1], bucket)
                        next_target = start_s + (np.floor((t - start_s) * fps - 1e-9) + 1) / fps
                    times.append(t)
                    if max_frames is not None and t > start_s + (max_frames + 1) / fps:
                        prev = None
                        break
                    prev = (t, frame.to_ndarray(format="rgb24"))
                    thumbs.append(thumbnail(prev[1]))
        except av.error.InvalidDataError as e:
            raise VideoRejected(path, "corrupt_frame", f"after {len(times)} frames: {e}") from None
        except av.FFmpegError as e:
            raise VideoRejected(path, "decode_error", f"after {len(times)} frames: {e}") from None
        if not times:
            raise VideoRejected(path, "no_frames")
        if prev is not None:
            kept[len(times) - 1] = self._resize(prev[1], bucket)
        source_times = np.asarray(times)
        if max_frames is None and counts["frames"] < counts["packets"] and info.codec not in _PLACEHOLDER_CODECS:
            raise VideoRejected(path, "corrupt_frame", f"the decoder dropped {counts['packets'] - counts['frames']} "
                                f"of {counts['packets']} frames without an error")
        bad = glitch_frames(np.stack(thumbs))
        if bad:
            raise VideoRejected(path, "corrupt_frame", f"source frame(s) {bad[:5]} (t={source_times[bad[0]]:.3f}s) "
                                "differ from both neighbours: concealed corruption or a glitch frame")
        if info.duration_s > 0 and max_frames is None:
            step = float(np.median(np.diff(source_times))) if len(times) > 1 else 0.0
            if source_times[-1] + step < self.truncation_tolerance * info.duration_s:
                raise VideoRejected(path, "truncated", f"decoded {source_times[-1] + step:.2f}s of a declared "
                                    f"{info.duration_s:.2f}s")
        target_times, idx = sample_indices(source_times, fps, start_s, max_frames=max_frames)
        if idx.size == 0:
            raise VideoRejected(path, "no_frames", f"no frame at or after {start_s}s")
        frames = torch.stack([kept[int(i)] for i in idx]).numpy()
        return DecodedVideo(frames=frames, times=target_times, source_index=idx, source_times=source_times,
                            fps=fps, info=info, notes=_notes(info, source_times))

    @staticmethod
    def _frames(container, stream, counts: dict):
        """Decoded frames of `stream`, counting packets in and frames out (a silent drop means corruption)."""
        for packet in container.demux(stream):
            counts["packets"] += packet.size > 0
            for frame in packet.decode():
                counts["frames"] += 1
                yield frame

    @staticmethod
    def _resize(rgb: np.ndarray, bucket: tuple[int, int]) -> torch.Tensor:
        return resize_center_crop(torch.from_numpy(rgb)[None], bucket)[0]


def _notes(info: VideoInfo, source_times: np.ndarray) -> list[tuple[str, str]]:
    notes = []
    if info.bit_depth > 8:
        notes.append(("high_bit_depth", f"{info.pix_fmt} ({info.bit_depth} bits) converted to 8-bit RGB"))
    if is_variable_frame_rate(source_times):
        d = np.diff(source_times)
        notes.append(("variable_frame_rate", f"pts steps {d.min():.4f}..{d.max():.4f}s"))
        if d.max() > 4 * np.median(d):
            notes.append(("timestamp_gap", f"{d.max():.3f}s gap after t={source_times[int(np.argmax(d))]:.3f}s"))
    return notes


def get_decoder(name: str = "pyav", **kwargs) -> VideoDecoder:
    """Backend by name: `pyav` (CPU), `dali` (GPU NVDEC; needs nvidia-dali), `dali-cpu` (DALI's CPU decoder:
    VP8/VP9/MJPEG only), `auto` (DALI on the GPU when importable and CUDA is present, else PyAV)."""
    if name == "auto":
        from . import decode_dali

        name = "dali" if decode_dali.dali_available() else "pyav"
    if name == "pyav":
        return PyAVDecoder(**kwargs)
    if name in ("dali", "dali-cpu"):
        from .decode_dali import DALIDecoder

        return DALIDecoder(device="gpu" if name == "dali" else "cpu", **kwargs)
    raise ValueError(f"data.decoder: unknown backend {name!r}. Fix: use 'pyav', 'dali', 'dali-cpu' or 'auto'")


# ----------------------------------------------------------------------------------------------------------
# Writing (fixtures, benchmarks, clip export)

def write_video(path: str, frames: np.ndarray, fps: float = 8.0, codec: str = "libx264",
                pix_fmt: str = "yuv420p", pts_s: Sequence[float] | None = None, container_format: str | None = None,
                options: dict | None = None) -> None:
    """Encode RGB uint8 frames `[T, H, W, 3]` with PyAV; `pts_s` gives explicit (e.g. irregular) timestamps."""
    import av

    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = pix_fmt
        stream.time_base = tb
        stream.codec_context.time_base = tb
        opts = {"bf": "0"} if pts_s is not None and codec == "libx264" else {}
        stream.options = {**opts, **(options or {})}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = int(round((pts_s[i] if pts_s is not None else i / fps) * 1000))
            frame.time_base = tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
