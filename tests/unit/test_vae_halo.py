"""Halo (chunked) VAE encoding equals the full encode; too-short halos are rejected; the minimum is tight."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.models.wan.vae import WanVAE
from megatron_longlive.models.wan.vae_halo import (
    MIN_HALO_FRAMES,
    HaloWindow,
    architecture_key,
    encode_frames_with_halo,
    halo_error_curve,
    halo_window,
    min_halo_frames,
)

LATENTS = 25  # 97 pixel frames: long enough that chunks from frame 81 on truncate the minimum halo (76)


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def vae_and_video(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny convs: one thread is fastest on a shared 2-core machine
    vae = WanVAE.tiny(request.param, seed=0)
    s = vae.spatial_stride
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 1 + 4 * (LATENTS - 1), s, s, generator=g) * 2 - 1  # [1, 3, 97, s, s]
    yield vae, video, vae.encode(video)
    torch.set_num_threads(threads)


def test_halo_window_table():
    # start 0: everything from frame 0, nothing dropped.
    assert halo_window(0, 9, 8) == HaloWindow(0, 9, 0, 3, 0)
    # Halo reaching frame 0: encode from 0 and drop the latents before `start`.
    assert halo_window(5, 13, 4) == HaloWindow(0, 13, 2, 2, 2)  # latent 0 <- frame 0, latent 1 <- frames 1-4
    assert halo_window(9, 13, 8) == HaloWindow(0, 13, 3, 1, 3)
    # Truncated: window starts one priming frame (= 0 mod 4) before the halo; drop priming + halo latents.
    assert halo_window(21, 29, 8) == HaloWindow(12, 29, 3, 2, 6)
    assert halo_window(21, 29, 0) == HaloWindow(20, 29, 1, 2, 6)


@pytest.mark.parametrize("start,end,halo,match", [
    (2, 9, 4, "start=2"), (4, 9, 4, "start=4"), (5, 5, 4, "end=5"), (5, 8, 4, "end=8"), (5, 9, 3, "halo=3"),
    (5, 9, -4, "halo=-4"),
])
def test_halo_window_rejects_bad_bounds(start, end, halo, match):
    with pytest.raises(ValueError, match=match):
        halo_window(start, end, halo)


def test_constants_cover_tiny_and_real_architectures():
    for kind in ("wan2.1", "wan2.2"):
        for tiny in (True, False):
            with torch.device("meta"):
                vae = WanVAE(__import__("diffusers").AutoencoderKLWan(**WanVAE.config_for(kind, tiny)), kind)
            assert min_halo_frames(vae) % 4 == 0 and min_halo_frames(vae) > 0
    assert len(MIN_HALO_FRAMES) == 4


@pytest.mark.parametrize("start,end", [
    (81, 97),  # 4 latents, halo truncated
    (85, 93),  # 2 latents, truncated, not at the video's end
    (93, 97),  # 1 latent, truncated
    (0, 25), (25, 57), (57, 97),  # a partition of the whole video (halo clipped at frame 0)
])
def test_halo_encode_equals_full_encode(vae_and_video, start, end):
    vae, video, full = vae_and_video
    part = encode_frames_with_halo(vae, video, start, end)  # default halo = measured minimum
    w = halo_window(start, end, min_halo_frames(vae))
    assert part.shape[2] == w.keep
    ref = full[:, :, w.latent_start:w.latent_start + w.keep]
    assert (part - ref).abs().max().item() <= 1e-5


def test_truncated_halo_encodes_fewer_frames(vae_and_video):
    vae, _, _ = vae_and_video
    w = halo_window(93, 97, min_halo_frames(vae))
    assert w.raw_start > 0 and w.raw_end - w.raw_start == min_halo_frames(vae) + 1 + 4


def test_minimum_halo_is_tight(vae_and_video):
    """At the minimum the chunk is exact; 4 frames less and it really differs (beyond float32 noise)."""
    vae, video, full = vae_and_video
    m = min_halo_frames(vae)
    (h_short, d_short), (h_min, d_min) = halo_error_curve(vae, video, 93, 97, [m - 4, m], full=full)
    assert d_min <= 1e-5
    assert d_short > 1e-7, f"halo {h_short} already matches ({d_short:.2e}); the recorded minimum is not tight"


def test_too_short_halo_rejected(vae_and_video):
    vae, video, _ = vae_and_video
    m = min_halo_frames(vae)
    with pytest.raises(ValueError, match=f"minimum halo is {m} frames"):
        encode_frames_with_halo(vae, video, 93, 97, halo=m - 4)
    with pytest.raises(ValueError, match="halo=6"):
        encode_frames_with_halo(vae, video, 93, 97, halo=6)
    with pytest.raises(ValueError, match="past the video"):
        encode_frames_with_halo(vae, video, 93, 101)


def test_short_halo_allowed_when_it_reaches_frame_zero(vae_and_video):
    vae, video, full = vae_and_video
    part = encode_frames_with_halo(vae, video[:, :, :13], 5, 13, halo=4)  # frames 1..4 + frame 0: whole prefix
    assert (part - full[:, :, 2:4]).abs().max().item() <= 1e-5


def test_unknown_architecture_needs_measurement():
    from diffusers import AutoencoderKLWan

    cfg = WanVAE.config_for("wan2.1", tiny=True)
    cfg["num_res_blocks"] = 3
    with torch.device("meta"):
        vae = WanVAE(AutoencoderKLWan(**cfg), "wan2.1")
    with pytest.raises(ValueError, match="measure_vae_receptive_field"):
        min_halo_frames(vae)
    assert "res3" in architecture_key(vae)
