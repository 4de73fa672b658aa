"""CUDA paths of the streaming VAE decoder and async decode.

float32 (TF32 off) chunked decode == diffusers' full decode on CUDA; BF16 PSNR vs float32 for the real
architectures (random weights, printed and asserted >= 30 dB); CUDA graph and torch.compile equal eager;
async decode on a side stream (and on a second GPU when present) delivers the frames of synchronous decode.
Run:  python -m pytest -q -s -m gpu tests/gpu/test_vae_decoder_gpu.py
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_longlive.inference.async_decode import AsyncDecodeConfig, AsyncDecoder
from megatron_longlive.models.wan.vae_decoder import StreamingVAEDecoder, StreamingWanDecoder, random_autoencoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def _stream(dec, z, k):
    return torch.cat([dec.decode(z[:, :, s:s + k]) for s in range(0, z.shape[2], k)], 2)


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cuda_float32_chunked_equals_diffusers(kind, k, no_tf32):
    model = random_autoencoder(kind, device="cuda", seed=1)
    z = torch.randn(1, model.config.z_dim, 4, 4, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = model.decode(z).sample
        dec = StreamingWanDecoder.from_diffusers(model).to_channels_last()
        state = dec.new_state(1, 4, 6, channels_last=True)
        out = torch.cat([dec.decode_chunk(z[:, :, s:s + k].contiguous(memory_format=torch.channels_last_3d), state)
                         for s in range(0, 4, k)], 2)
    assert (out - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("kind, hw, k", [("wan2.1", (16, 16), 3), ("wan2.2", (8, 16), 2)])
def test_bf16_psnr_vs_float32(kind, hw, k, no_tf32):
    model = random_autoencoder(kind, device="cuda", seed=0)
    z = torch.randn(1, model.config.z_dim, 2 * k, *hw, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = _stream(StreamingVAEDecoder(model, dtype=torch.float32), z, k)
    with torch.no_grad():
        full = model.decode(z * torch.tensor(model.config.latents_std, device="cuda").view(1, -1, 1, 1, 1)
                            + torch.tensor(model.config.latents_mean, device="cuda").view(1, -1, 1, 1, 1)).sample
    assert (ref - full).abs().max() <= 1e-4  # our float32 stream is the diffusers float32 decode
    low = _stream(StreamingVAEDecoder(model, dtype=torch.bfloat16), z, k)
    p_first, p_later = _psnr(low[:, :, :1 + 4 * (k - 1)], ref[:, :, :1 + 4 * (k - 1)]), _psnr(low[:, :, 4 * k - 3:],
                                                                                              ref[:, :, 4 * k - 3:])
    print(f"\n{kind} bf16 vs float32 PSNR: first chunk {p_first:.1f} dB, later chunk {p_later:.1f} dB "
          f"(random weights, latents {hw})")
    assert min(p_first, p_later) >= 30


@pytest.mark.parametrize("variant", ["graph", "compile", "compile+graph"])
def test_cuda_graph_and_compile_equal_eager(variant):
    model = random_autoencoder("wan2.1", device="cuda", dtype=torch.bfloat16, seed=2)
    z = torch.randn(1, 16, 7, 8, 12, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = _stream(StreamingVAEDecoder(model), z, 2)
    fast = StreamingVAEDecoder(model, compile="compile" in variant, cuda_graph="graph" in variant)
    out = _stream(fast, z, 2)
    fast.reset()  # a second clip replays the same graph on the zeroed caches
    again = _stream(fast, z, 2)
    assert _psnr(out, eager) >= 40 and _psnr(again, eager) >= 40
    if variant == "graph":
        assert (out.float() - eager.float()).abs().max() <= 1e-2


def _frames(mode: str, model, chunks, device=None):
    dec = StreamingVAEDecoder(model, device=device or "cuda")
    got = []
    with AsyncDecoder(dec.decode, got.append, AsyncDecodeConfig(mode=mode, device=device, max_queue=1)) as ad:
        for c in chunks:
            ad.submit(c)
    return got


def test_async_stream_mode_equals_sync():
    model = random_autoencoder("wan2.1", device="cuda", dtype=torch.bfloat16, seed=3)
    g = torch.Generator("cuda").manual_seed(0)
    chunks = [torch.randn(1, 16, 3, 8, 12, device="cuda", generator=g) for _ in range(4)]
    ref = _frames("sync", model, chunks)
    got = _frames("stream", model, chunks)
    assert len(got) == len(ref) == 4
    assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(got, ref))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_async_dedicated_device_equals_sync():
    model = random_autoencoder("wan2.1", device="cuda:1", dtype=torch.bfloat16, seed=3)
    g = torch.Generator("cuda:0").manual_seed(0)
    chunks = [torch.randn(1, 16, 3, 8, 12, device="cuda:0", generator=g) for _ in range(4)]
    ref = _frames("sync", model, [c.to("cuda:1") for c in chunks], device="cuda:1")
    got = _frames("device", model, chunks, device="cuda:1")
    assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(got, ref))
