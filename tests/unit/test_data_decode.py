"""PyAV decoding: pts-based sampling (VFR), buckets/crop, codecs, and every bad input with its named reason."""
from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
import torch

from dataloaders.decode import (PyAVDecoder, VideoRejected, choose_bucket, glitch_frames, resize_center_crop,
                                sample_indices, write_video)


def gray_ramp(n: int, size: int = 32, step: int = 9) -> np.ndarray:
    """Frame i is a flat gray of value step*i: its index can be read back through any codec."""
    return np.stack([np.full((size, size, 3), step * i, np.uint8) for i in range(n)])


def textured(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size * 2, 3), dtype=np.uint8)
    return np.stack([np.roll(base, i, axis=1)[:, :size] for i in range(n)])


def smooth(n: int, size: int = 64) -> np.ndarray:
    """A gradient with a soft moving blob: compresses like natural video (unlike noise)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for i in range(n):
        cx, cy = 10 + i * 0.8, 20 + 10 * np.sin(i / 6)
        img = np.stack([xx * 3, yy * 3, 128 + 100 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 60)], -1)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def direct_frames(path: str) -> np.ndarray:
    """Reference: every frame as PyAV hands it out, no sampling."""
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_constant_rate_decode_equals_plain_pyav(tmp_path):
    p = str(tmp_path / "a.mp4")
    write_video(p, textured(12), fps=8)
    out = PyAVDecoder().decode(p, fps=8, buckets=[(32, 32)])
    np.testing.assert_array_equal(out.frames, direct_frames(p))
    np.testing.assert_array_equal(out.source_index, np.arange(12))
    assert out.notes == []


def test_variable_frame_rate_samples_by_pts(tmp_path):
    pts = [0, .1, .15, .4, .41, .6, .9, 1.0, 1.1, 1.5, 1.6, 1.7]
    p = str(tmp_path / "vfr.mp4")
    write_video(p, gray_ramp(len(pts)), fps=10, pts_s=pts)
    out = PyAVDecoder().decode(p, fps=10, buckets=[(32, 32)])
    # independent expectation: at t = k/10 the frame on screen is the last one with pts <= t
    step = np.median(np.diff(pts))
    expect = []
    k = 0
    while k / 10 < pts[-1] + step - 1e-9:
        expect.append(max(i for i, t in enumerate(pts) if t <= k / 10 + 1e-9))
        k += 1
    np.testing.assert_array_equal(out.source_index, expect)
    shown = out.frames[..., 0].astype(float).mean((1, 2))
    np.testing.assert_allclose(shown, 9 * np.array(expect), atol=3)
    assert [n for n, _ in out.notes] == ["variable_frame_rate"]


def test_resample_to_lower_fps_and_clip_extraction(tmp_path):
    p = str(tmp_path / "a.mkv")
    write_video(p, gray_ramp(24), fps=8, codec="ffv1", pix_fmt="yuv444p")
    out = PyAVDecoder().decode(p, fps=4, buckets=[(32, 32)], start_s=1.0, max_frames=3)
    np.testing.assert_array_equal(out.source_index, [8, 10, 12])
    np.testing.assert_allclose(out.times, [1.0, 1.25, 1.5])
    np.testing.assert_array_equal(out.frames[:, 0, 0, 0], [72, 90, 108])  # ffv1 is lossless


@pytest.mark.parametrize("codec,pix,ext", [("libx264", "yuv420p", "mp4"), ("libvpx-vp9", "yuv420p", "webm"),
                                           ("mjpeg", "yuvj420p", "mkv"), ("libx264", "yuv420p10le", "mp4")])
def test_codecs_decode(tmp_path, codec, pix, ext):
    p = str(tmp_path / f"v.{ext}")
    frames = gray_ramp(9, step=25)
    write_video(p, frames, fps=8, codec=codec, pix_fmt=pix)
    out = PyAVDecoder().decode(p, fps=8, buckets=[(32, 32)])
    assert out.frames.shape == (9, 32, 32, 3) and out.frames.dtype == np.uint8
    np.testing.assert_allclose(out.frames.astype(float).mean((1, 2, 3)), frames.mean((1, 2, 3)), atol=4)
    assert ("high_bit_depth" in [n for n, _ in out.notes]) == pix.endswith("10le")


def test_choose_bucket_and_center_crop():
    assert choose_bucket(480, 832, [(480, 832), (832, 480), (512, 512)]) == (480, 832)
    assert choose_bucket(1080, 1080, [(480, 832), (512, 512)]) == (512, 512)
    assert choose_bucket(1920, 1080, [(480, 832), (832, 480)]) == (832, 480)
    # a 32x64 frame: left quarter red, middle half green, right quarter blue -> a square bucket keeps the green
    f = np.zeros((1, 32, 64, 3), np.uint8)
    f[:, :, :16, 0] = 255
    f[:, :, 16:48, 1] = 255
    f[:, :, 48:, 2] = 255
    out = resize_center_crop(torch.from_numpy(f), (16, 16)).numpy()
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(out[0, :, 1:-1], np.broadcast_to([0, 255, 0], (16, 14, 3)))
    same = resize_center_crop(torch.from_numpy(f), (32, 64))
    assert torch.equal(same, torch.from_numpy(f))


def test_sample_indices_edges():
    t, i = sample_indices(np.array([0.0, 0.5, 1.0]), fps=4)
    np.testing.assert_allclose(t, np.arange(6) / 4)
    np.testing.assert_array_equal(i, [0, 0, 1, 1, 2, 2])
    t, i = sample_indices(np.array([0.0, 0.5, 1.0]), fps=4, max_frames=3)
    assert len(t) == 3


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: each becomes VideoRejected with a named reason

def _audio_only(path):
    with av.open(path, "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = 16000, i * 1024, fractions.Fraction(1, 16000)
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def flip_middle(path: str, nbytes: int = 64) -> None:
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + nbytes] = bytes(b ^ 0xFF for b in data[mid:mid + nbytes])
    open(path, "wb").write(bytes(data))


def make_bad(kind: str, d, ext: str = "mp4") -> str:
    """Write one bad-input fixture of `kind` under `d`; returns its path."""
    p = str(d / f"{kind}.{ext}")
    if kind == "empty_file":
        open(p, "wb").close()
    elif kind == "not_a_video":
        with open(p, "w") as fh:
            fh.write("this is a text file with a video extension\n" * 20)
    elif kind == "no_video_stream":
        _audio_only(p)
    elif kind == "resolution_too_small":
        write_video(p, np.zeros((4, 1, 1, 3), np.uint8), codec="libx264", pix_fmt="yuv444p")
    elif kind == "truncated":
        write_video(p, smooth(48), fps=8)
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) * 6 // 10])
    elif kind == "corrupt_frame":  # H.264 in mp4, or MJPEG in mkv with ext="mkv"
        write_video(p, smooth(48), fps=8, **({"codec": "mjpeg", "pix_fmt": "yuvj420p"} if ext == "mkv" else {}))
        flip_middle(p)
    elif kind == "missing_file":
        pass
    else:
        raise AssertionError(kind)
    return p


BAD = ["empty_file", "not_a_video", "no_video_stream", "resolution_too_small", "truncated", "corrupt_frame",
       "missing_file"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_inputs_are_rejected_with_their_reason(tmp_path, kind):
    p = make_bad(kind, tmp_path)
    with pytest.raises(VideoRejected) as e:
        PyAVDecoder(min_side=16).decode(p, fps=8, buckets=[(32, 32)])
    assert e.value.reason == kind, str(e.value)
    assert p in str(e.value)


def test_corrupt_mjpeg_frame_is_rejected(tmp_path):
    p = make_bad("corrupt_frame", tmp_path, ext="mkv")
    with pytest.raises(VideoRejected) as e:
        PyAVDecoder(min_side=16).decode(p, fps=8, buckets=[(32, 32)])
    assert e.value.reason == "corrupt_frame", str(e.value)


def test_glitch_frame_detector():
    base = smooth(12).astype(np.float32).mean(-1)[:, ::4, ::4]  # [12, 16, 16] thumbnails
    assert glitch_frames(base) == []
    bad = base.copy()
    bad[5, :8] = 255 - bad[5, :8]  # half a frame of garbage
    assert glitch_frames(bad) == [5]
    cut = base.copy()
    cut[6:] = 255 - cut[6:]  # a scene cut is not a glitch
    assert glitch_frames(cut) == []


def test_truncated_matroska_prefix_is_detected(tmp_path):
    """A cut-short webm still opens; the decoded span falls short of the declared duration."""
    p = str(tmp_path / "t.webm")
    write_video(p, textured(64, 64), fps=8, codec="libvpx-vp9")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(VideoRejected) as e:
        PyAVDecoder(min_side=16).decode(p, fps=8, buckets=[(32, 32)])
    assert e.value.reason in ("truncated", "corrupt_frame"), str(e.value)
