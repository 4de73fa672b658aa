"""DALI's CPU video decoder (`data.decoder=dali-cpu`) against PyAV: same frames, same named rejections.

Both backends take frame times from the same PyAV packet pass and share `resize_center_crop`, so with 4:4:4
sources (no chroma upsampling) they must agree bit for bit. With 4:2:0 sources they differ only in how the
chroma planes are upsampled before YUV->RGB; measured on `smooth` 128x128 clips (mean / 99.9th pct / max
|diff|, 0..255): VP9 1.07 / 3 / 11, VP8 1.07 / 3 / 11, MJPEG 0.73 / 4 / 17 at 12 fps into a 64x96 bucket;
1.18 / 6 / 20, 1.18 / 7 / 22, 1.00 / 7 / 34 at the source size and fps. Tolerance: mean <= 1.5 and
99.9th pct <= 10. (Per-pixel noise is the worst case for chroma upsampling: mean 6-9, not tested.)
Skipped only when nvidia.dali is not importable; no GPU needed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from dataloaders.decode import PyAVDecoder, VideoRejected, get_decoder, write_video  # noqa: E402
from dataloaders.decode_dali import UnsupportedCodec  # noqa: E402

from test_data_decode import make_bad, smooth, textured  # noqa: E402

CODECS = {"vp9": ("libvpx-vp9", "yuv420p", "webm"), "vp8": ("libvpx", "yuv420p", "webm"),
          "mjpeg": ("mjpeg", "yuvj420p", "mkv")}


@pytest.fixture(scope="module")
def dali_cpu():
    return get_decoder("dali-cpu")


def diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99.9))


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("fps,bucket", [(12, (64, 96)), (24, (128, 128))])
def test_dali_cpu_matches_pyav(tmp_path, dali_cpu, codec, fps, bucket):
    enc, pix, ext = CODECS[codec]
    p = str(tmp_path / f"v.{ext}")
    write_video(p, smooth(40, 128), fps=24, codec=enc, pix_fmt=pix)
    a = PyAVDecoder().decode(p, fps=fps, buckets=[bucket])
    b = dali_cpu.decode(p, fps=fps, buckets=[bucket])
    assert b.info.codec == codec and a.frames.shape == b.frames.shape
    assert a.frames.shape[1:3] == bucket and a.num_frames >= 20
    np.testing.assert_array_equal(a.source_index, b.source_index)
    np.testing.assert_allclose(a.times, b.times)
    np.testing.assert_allclose(a.source_times, b.source_times)
    mean, p999 = diff_stats(a.frames, b.frames)
    assert mean <= 1.5 and p999 <= 10, (codec, mean, p999)


@pytest.mark.parametrize("enc,pix,ext", [("libvpx-vp9", "yuv444p", "webm"), ("mjpeg", "yuvj444p", "mkv")])
def test_dali_cpu_is_bit_exact_without_chroma_subsampling(tmp_path, dali_cpu, enc, pix, ext):
    """4:4:4 (per-pixel noise, the hardest content): identical RGB, so the 4:2:0 gap is chroma upsampling only."""
    p = str(tmp_path / f"v.{ext}")
    write_video(p, textured(24), fps=8, codec=enc, pix_fmt=pix)
    a = PyAVDecoder().decode(p, fps=4, buckets=[(32, 32)])
    b = dali_cpu.decode(p, fps=4, buckets=[(32, 32)])
    np.testing.assert_array_equal(a.source_index, b.source_index)
    np.testing.assert_array_equal(a.frames, b.frames)


@pytest.mark.parametrize("kind", ["empty_file", "not_a_video", "missing_file", "no_video_stream", "truncated"])
def test_dali_cpu_rejects_bad_inputs_by_name(tmp_path, dali_cpu, kind):
    p = make_bad(kind, tmp_path)
    for dec in (PyAVDecoder(), dali_cpu):
        with pytest.raises(VideoRejected) as e:
            dec.decode(p, fps=8, buckets=[(32, 32)])
        assert e.value.reason == kind, (dec.name, e.value)


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_rejects_truncated_stream(tmp_path, dali_cpu, codec):
    """Matroska cut at 60%: it still opens, so the short decode against the declared duration must catch it."""
    enc, pix, ext = CODECS[codec]
    p = str(tmp_path / f"t.{ext}")
    write_video(p, smooth(48), fps=8, codec=enc, pix_fmt=pix)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) * 6 // 10])
    for dec in (PyAVDecoder(), dali_cpu):
        with pytest.raises(VideoRejected) as e:
            dec.decode(p, fps=8, buckets=[(32, 32)])
        assert e.value.reason == "truncated", (dec.name, e.value)


def test_dali_cpu_names_unsupported_codec_and_fix(tmp_path, dali_cpu):
    p = str(tmp_path / "h.mp4")
    write_video(p, smooth(8), fps=8)  # H.264: NVDEC or PyAV only
    with pytest.raises(UnsupportedCodec, match=r"'h264'.*data.decoder=dali \(GPU, NVDEC\) or data.decoder=pyav"):
        dali_cpu.decode(p, fps=8, buckets=[(32, 32)])


def test_dali_cpu_fallback_decodes_with_pyav_and_says_so(tmp_path):
    """cpu_fallback=True: an H.264 file comes back as PyAV decodes it, with a pyav_fallback note (the same path
    takes the streams NVDEC cannot decode on the GPU, where the fallback is on by default)."""
    from dataloaders.decode_dali import DALIDecoder

    p = str(tmp_path / "h.mp4")
    write_video(p, smooth(12), fps=8)
    ref = PyAVDecoder().decode(p, fps=4, buckets=[(32, 32)])
    out = DALIDecoder(device="cpu", cpu_fallback=True).decode(p, fps=4, buckets=[(32, 32)])
    np.testing.assert_array_equal(out.frames, ref.frames)
    np.testing.assert_array_equal(out.source_index, ref.source_index)
    assert out.notes[-1][0] == "pyav_fallback" and "h264" in out.notes[-1][1], out.notes


def test_dali_rejects_frames_without_packets(tmp_path, dali_cpu):
    """AVI pads a 1/1000 time base with empty packets; DALI decodes those as repeats, so frame times are unknown."""
    p = str(tmp_path / "m.avi")
    write_video(p, smooth(4), fps=24, codec="mjpeg", pix_fmt="yuvj420p")
    assert PyAVDecoder().decode(p, fps=24, buckets=[(32, 32)]).source_times.size == 4
    with pytest.raises(VideoRejected) as e:
        dali_cpu.decode(p, fps=24, buckets=[(32, 32)])
    assert e.value.reason == "decode_error" and "non-empty packets" in e.value.detail


def test_batched_thumbnails_match_numpy_reference():
    """The GPU path's batched thumbnails (glitch detection), run here on CPU tensors, equal `decode.thumbnail`."""
    from dataloaders.decode import thumbnail
    from dataloaders.decode_dali import _thumbnails, _thumbnails_torch

    frames = np.random.default_rng(0).integers(0, 256, (5, 70, 131, 3), dtype=np.uint8)  # sides not multiples of 16
    ref = np.stack([thumbnail(f) for f in frames])
    np.testing.assert_allclose(_thumbnails_torch(torch.from_numpy(frames)), ref, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(_thumbnails(torch.from_numpy(frames)), ref)


def test_dali_failure_is_named_and_the_next_file_decodes(tmp_path, dali_cpu):
    """A failed DALI run (here H.264 fed past the codec check) names DALI's message and leaves a working pipeline."""
    h264, vp9 = str(tmp_path / "h.mp4"), str(tmp_path / "v.webm")
    write_video(h264, smooth(8), fps=8)
    write_video(vp9, smooth(8), fps=8, codec="libvpx-vp9")
    with pytest.raises(VideoRejected) as e:
        dali_cpu._decode_all(h264)
    assert e.value.reason == "decode_error" and "Critical error" not in e.value.detail, e.value.detail
    np.testing.assert_array_equal(dali_cpu.decode(vp9, fps=8, buckets=[(32, 32)]).frames,
                                  get_decoder("dali-cpu").decode(vp9, fps=8, buckets=[(32, 32)]).frames)


def test_nvdec_limits_are_told_from_bad_files():
    """DALI's messages (H200, DALI 2.4.0, 2026-12-06) for streams NVDEC cannot take go to the PyAV fallback; a
    decode failure of a bad file stays a rejection (the GPU test checks the fallback's frames)."""
    from dataloaders.decode_dali import is_nvdec_limit

    assert is_nvdec_limit('Assert on "frames_decoders_[s]->IsValid()" failed: Failed to create video decoder for '
                          '"memory file"')                                         # AV1 on Hopper's NVDEC
    assert is_nvdec_limit('Assert on "width >= caps.nMinWidth && height >= caps.nMinHeight" failed: Video is too '
                          'small in at least one dimension. Provided: 128x128 vs supported:144x144')   # HEVC 128x128
    assert not is_nvdec_limit("Error while decoding frame: Invalid data found when processing input")
