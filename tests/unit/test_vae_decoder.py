"""Streaming VAE decoder: chunk-by-chunk decode equals diffusers' full-video `AutoencoderKLWan.decode`.

The oracle is diffusers' own decode (frame-by-frame loop with its feat_cache) on the same weights, float32.
Tiny configs run in the default lane; the real Wan2.1 / Wan2.2 architectures (random weights, 1-2 latent pixels
wide, 4 latent frames) in the slow lane because building and running them on 2 CPU cores takes minutes.
"""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.models.wan.vae import WanVAE
from megatron_longlive.models.wan.vae_decoder import (StreamingVAEDecoder, StreamingWanDecoder,
                                                      random_autoencoder)

TOL = 1e-4


def _chunks(num_frames: int, k: int) -> list[tuple[int, int]]:
    return [(i, min(i + k, num_frames)) for i in range(0, num_frames, k)]


def _stream_decode(dec: StreamingWanDecoder, z: torch.Tensor, k: int, channels_last: bool = False):
    b, _, f, h, w = z.shape
    state = dec.new_state(b, h, w, channels_last=channels_last)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    outs = []
    for i, (s, e) in enumerate(_chunks(f, k)):
        out = dec.decode_chunk(z[:, :, s:e].contiguous(memory_format=fmt), state)
        # the 1 + 4k rule: the clip's first latent frame decodes to 1 pixel frame, every later one to 4
        assert out.shape[2] == 4 * (e - s) - (3 if i == 0 else 0)
        assert out.shape[2] == dec.pixel_frames(e - s, first=i == 0)
        outs.append(out)
    return torch.cat(outs, dim=2)


def _check_meaningful(ref: torch.Tensor) -> None:
    # the comparison must not be decided by the final clamp: most pixels are inside (-1, 1)
    assert (ref.abs() < 1).float().mean() > 0.9 and ref.std() > 0.05


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def tiny_case(request):
    vae = WanVAE.tiny(request.param, seed=3)
    z = torch.randn(2, vae.z_dim, 5, 2, 3, generator=torch.Generator().manual_seed(1))  # batch 2, non-square
    with torch.no_grad():
        ref = vae.model.decode(z).sample  # diffusers, full video
    _check_meaningful(ref)
    return vae, z, ref, StreamingWanDecoder.from_diffusers(vae.model)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tiny_chunked_equals_diffusers_full_decode(tiny_case, k):
    vae, z, ref, dec = tiny_case
    with torch.no_grad():
        out = _stream_decode(dec, z, k)
    assert out.shape == ref.shape == (2, 3, 17, 2 * vae.spatial_stride, 3 * vae.spatial_stride)
    assert (out - ref).abs().max() <= TOL
    # first chunk and later chunks separately (the error is not hiding in one part)
    first = 1 + 4 * (k - 1)
    assert (out[:, :, :first] - ref[:, :, :first]).abs().max() <= TOL
    assert (out[:, :, first:] - ref[:, :, first:]).abs().max() <= TOL


def test_tiny_channels_last_equals_contiguous(tiny_case):
    _, z, ref, dec = tiny_case
    with torch.no_grad():
        try:
            out = _stream_decode(dec.to_channels_last(), z, 2, channels_last=True)
        finally:
            dec.to_channels_last(False)
    assert (out - ref).abs().max() <= TOL


def test_state_reset_restarts_the_clip_in_place(tiny_case):
    _, z, ref, dec = tiny_case
    state = dec.new_state(2, 2, 3)
    addresses = [c.data_ptr() for c in state.caches]
    with torch.no_grad():
        a = torch.cat([dec.decode_chunk(z[:, :, s:e], state) for s, e in _chunks(5, 3)], 2)
        state.reset()
        b = torch.cat([dec.decode_chunk(z[:, :, s:e], state) for s, e in _chunks(5, 3)], 2)
    assert [c.data_ptr() for c in state.caches] == addresses  # fixed addresses: CUDA-graph friendly
    assert torch.equal(a, b) and (a - ref).abs().max() <= TOL


def test_caches_carry_state_not_zero_padding(tiny_case):
    """A later chunk decoded with fresh (zero) caches differs from the streamed one: the carried cache matters."""
    _, z, ref, dec = tiny_case
    with torch.no_grad():
        state = dec.new_state(2, 2, 3)
        dec.decode_chunk(z[:, :, :2], state)
        fresh = dec.new_state(2, 2, 3)
        fresh.first = False
        wrong = dec.decode_chunk(z[:, :, 2:4], fresh)
    assert (wrong - ref[:, :, 5:13]).abs().max() > 1e-2


def test_normalized_api_equals_wanvae_decode():
    vae = WanVAE.tiny("wan2.2", seed=5)
    z = torch.randn(1, vae.z_dim, 5, 2, 4, generator=torch.Generator().manual_seed(2))
    ref = vae.decode(z)  # normalized latents -> pixels (WanVAE convention)
    dec = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32)
    out = torch.cat([dec.decode(z[:, :, s:e]) for s, e in _chunks(5, 2)], 2)
    assert (out - ref).abs().max() <= TOL
    dec.reset()  # a second clip through the same object
    again = torch.cat([dec.decode(z[:, :, s:e]) for s, e in _chunks(5, 3)], 2)
    assert (again - ref).abs().max() <= TOL


def test_bad_inputs_have_clear_errors():
    vae = WanVAE.tiny("wan2.1")
    dec = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[B, 16, k, h, w\]"):
        dec.decode(torch.zeros(1, 8, 1, 2, 2))
    dec.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="reset"):
        dec.decode(torch.zeros(1, 16, 1, 4, 4))
    other = WanVAE.tiny("wan2.2").model.state_dict()
    with pytest.raises(ValueError, match="decoder tensors|shape"):
        StreamingWanDecoder(dict(vae.model.config)).load_diffusers_state_dict(other)
    with pytest.raises(ValueError, match="cuda_graph"):
        StreamingVAEDecoder(vae, device="cpu", cuda_graph=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind, hw", [("wan2.1", (2, 2)), ("wan2.2", (1, 2))])
def test_real_architecture_chunked_equals_diffusers(kind, hw):
    """The official Wan2.1 (73 M-param decoder) / Wan2.2 (555 M) architectures with random weights."""
    model = random_autoencoder(kind, seed=0)
    dec = StreamingWanDecoder.from_diffusers(model)
    z = torch.randn(1, model.config.z_dim, 4, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.decode(z).sample
        _check_meaningful(ref)
        for k in (1, 2, 3):
            out = _stream_decode(dec, z, k)
            assert out.shape == ref.shape
            assert (out - ref).abs().max() <= TOL, (kind, k)


def test_large_chunks_split_into_exact_sub_chunks():
    """A chunk over the activation limit is decoded as sub-chunks in sequence: same frames (the caches carry)."""
    vae = WanVAE.tiny("wan2.1", seed=6)
    z = torch.randn(1, vae.z_dim, 9, 2, 3, generator=torch.Generator().manual_seed(4))
    ref = vae.decode(z)
    probe = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32)
    limit = probe.net.largest_activation(1, 2, 3, 2)
    dec = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32, max_elements=limit)
    assert dec.sub_chunk(1, 2, 3, 4) == 2 and dec.sub_chunk(1, 2, 3, 3) == 1 and probe.sub_chunk(1, 2, 3, 4) == 4
    out = torch.cat([dec.decode(z[:, :, s:e]) for s, e in [(0, 4), (4, 8), (8, 9)]], 2)
    assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
    with pytest.raises(ValueError, match="max_elements"):
        StreamingVAEDecoder(vae, device="cpu", max_elements=10).decode(z[:, :, :1])


@pytest.mark.parametrize("cin,cout,t,h,w", [(3, 5, 2, 4, 6), (4, 4, 1, 1, 1), (6, 2, 2, 7, 3)])
def test_upsampling_conv_equals_upsample_then_conv(cin, cout, t, h, w):
    """NearestUp2xConv (2x2 phase kernels on the source) equals F.interpolate(nearest 2x) + the 3x3 conv, float64,
    in both layouts (1x1 and odd sizes: the zero border of the upsampled image is the source's)."""
    from megatron_longlive.models.wan.vae_decoder import NearestUp2xConv

    torch.manual_seed(0)
    m = NearestUp2xConv(cin, cout, 2).double()
    x = torch.randn(2, cin, t, h, w, dtype=torch.float64)
    want = torch.nn.functional.conv3d(torch.nn.functional.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"),
                                      m.weight, m.bias, padding=(0, 1, 1))
    for inp in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        out = m(inp)
        assert out.shape == want.shape and (out - want).abs().max() <= 1e-12 * want.abs().max()
    assert m(x.contiguous(memory_format=torch.channels_last_3d)).is_contiguous(memory_format=torch.channels_last_3d)
