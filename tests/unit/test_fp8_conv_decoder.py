"""FP8 convs swapped into the streaming Wan decoder from outside (quant/fp8_conv/module.py), under TRITON_INTERPRET=1.

Tiny random Wan2.1 / Wan2.2 decoders with every CausalConv3d in FP8 (the default rule keeps all convs of the tiny
widths in the decoder's dtype, so the tests select all). The input scale is dynamic per call (one amax per conv
input per chunk), so a chunked decode is NOT bitwise the one-call decode: chunk boundaries change the scales.
(The convs fed by silu(RMSNorm) use static bounds, chunk-independent; conv_in, time_conv, resample and the 1x1x1
convs keep dynamic scales.) Asserted instead: streaming still decodes 1 + 4(k-1) / 4k frames with the same cache
slots, its PSNR against the FP8 one-call decode and both against the float32 decode are above floors measured
here (seed 3, latents 1x2, 3 frames: full/stream vs fp32 29.1/28.7 dB wan2.1, 34.2/36.0 dB wan2.2; stream vs
full 29.9 / 35.8 dB) minus 2.5 dB. (All dynamic scales measured 29.8/29.4, 34.2/35.5; 29.7/35.6 dB.)
The kernel's numerics are tested against float64 in test_fp8_conv.py; here a bigger interpreter tile keeps a decode
to ~7 s.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - the GPU lane runs tests/gpu/test_fp8_conv_gpu.py
    pytest.skip("interpreter tests run on CPU machines", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"

from megatron_longlive.models.wan.vae import WanVAE  # noqa: E402
from megatron_longlive.models.wan.vae_decoder import (CausalConv3d, StreamingVAEDecoder,  # noqa: E402
                                                      StreamingWanDecoder, random_autoencoder)
from megatron_longlive.quant.fp8_conv import ops  # noqa: E402
from megatron_longlive.quant.fp8_conv.module import (FP8CausalConv3d, apply_fp8_convs,  # noqa: E402
                                                     norm_silu_bounds, predicted_speedup)

FLOOR_DB = {"wan2.1": (26.5, 26.1, 27.4), "wan2.2": (31.7, 33.4, 33.2)}  # full vs fp32, stream vs fp32, stream vs full
ALL = lambda name, conv: True  # noqa: E731


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.fixture
def big_tile(monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET_TILE", (512, 32, 16))


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_fp8_streaming_decode_psnr_floors(kind, big_tile, one_thread):
    model = random_autoencoder(kind, tiny=True, seed=3)
    ref = StreamingWanDecoder.from_diffusers(model)
    fp8 = StreamingWanDecoder.from_diffusers(model)
    slots = [(type(m), m.slot) for m in ref.temporal_convs]
    names = apply_fp8_convs(fp8, ALL)
    assert len(names) == sum(isinstance(m, CausalConv3d) for m in ref.modules())
    assert all(isinstance(m, FP8CausalConv3d) for m in fp8.modules() if isinstance(m, CausalConv3d))
    assert [m.slot for m in fp8.temporal_convs] == [s for _, s in slots]         # same caches, same order
    assert not any(p.dim() == 5 for p in fp8.parameters())                       # bf16/fp32 conv weights released
    z = torch.randn(1, ref.z_dim, 3, 1, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode_chunk(z, ref.new_state(1, 1, 2))
        full = fp8.decode_chunk(z, fp8.new_state(1, 1, 2))
        state = fp8.new_state(1, 1, 2)
        parts = [fp8.decode_chunk(z[:, :, s:e], state) for s, e in ((0, 1), (1, 3))]
    assert [p.shape[2] for p in parts] == [1, 8] and full.shape == want.shape
    stream = torch.cat(parts, dim=2)
    assert torch.isfinite(stream).all() and want.std() > 0.1
    got = (psnr(full, want), psnr(stream, want), psnr(stream, full))
    assert all(g >= f for g, f in zip(got, FLOOR_DB[kind])), (kind, got, FLOOR_DB[kind])


def test_default_rule_on_the_real_architectures():
    """Which convs the roofline rule sends to FP8 (weights on meta: nothing is materialized)."""
    for kind in ("wan2.1", "wan2.2"):
        with torch.device("meta"):
            net = StreamingWanDecoder(WanVAE.config_for(kind))
        convs = {n: m for n, m in net.named_modules() if isinstance(m, CausalConv3d)}
        names = set(apply_fp8_convs(net, static_bounds=False))   # (bounds need real gammas)
        kept = set(convs) - names
        assert "decoder.conv_out" in kept and "post_quant_conv" in kept and "decoder.conv_in" in names
        assert all(n.endswith("conv_shortcut") for n in kept - {"decoder.conv_out", "post_quant_conv"}), kept
        assert all(tuple(convs[n].weight.shape[2:]) != (1, 1, 1) for n in names)
        assert all(predicted_speedup(convs[n]) > 1.3 for n in names)
        assert names >= {n for n in convs if "time_conv" in n or "resample" in n}


def test_streaming_vae_decoder_conv_precision(big_tile, one_thread):
    vae = WanVAE.tiny("wan2.1", seed=3)
    z = torch.randn(1, vae.z_dim, 2, 1, 2, generator=torch.Generator().manual_seed(2))
    ref = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32, conv_precision="fp8")  # tiny: nothing gains
    assert any("picked no conv" in str(w.message) for w in caught)
    dec = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32, conv_precision="fp8", fp8_select=ALL)
    assert isinstance(dec.net.decoder.conv_in, FP8CausalConv3d)
    out, want = dec.decode(z), ref.decode(z)
    assert out.shape == want.shape and psnr(out, want) > 25.0
    with pytest.raises(ValueError, match="conv_precision"):
        StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32, conv_precision="int8")


def test_fp8_needs_cuda_or_the_interpreter(monkeypatch):
    from megatron_longlive.quant.fp8_conv.module import check_fp8_device

    check_fp8_device(torch.device("cpu"))                       # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="vae_conv=bf16"):
        check_fp8_device(torch.device("cpu"))


def test_infer_config_vae_conv():
    from megatron_longlive.config.base import ConfigError
    from megatron_longlive.config.infer import InferConfig

    assert InferConfig(vae_conv="fp8").vae_conv == "fp8" and InferConfig().vae_conv == "bf16"
    with pytest.raises(ConfigError, match="infer.vae_conv"):
        InferConfig(vae_conv="int8")


def test_compiled_fp8_conv_module_equals_eager(one_thread):
    """torch.compile (Inductor, fullgraph) through the custom op, the uint8 -> E4M3 weight view and the in-place
    cache update: bitwise the eager module over two chunks."""
    torch.manual_seed(0)
    conv = CausalConv3d(16, 24, (3, 3, 3))
    conv.slot = 0
    m = FP8CausalConv3d.from_conv(conv)
    fn = torch.compile(m, fullgraph=True)
    eager_cache, compiled_cache = [torch.zeros(1, 16, 2, 4, 5)], [torch.zeros(1, 16, 2, 4, 5)]
    x = torch.randn(1, 16, 2, 4, 5)
    with torch.no_grad():
        for i in range(2):
            assert torch.equal(fn(x + i, compiled_cache), m(x + i, eager_cache))
            assert torch.equal(compiled_cache[0], eager_cache[0]) and compiled_cache[0].abs().sum() > 0


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_norm_silu_bounds_hold(kind, one_thread):
    """The static input bounds are bounds: max |input| of every bounded conv over a float32 decode with random gains
    (gamma ~ N(1, 0.5)) stays below them, and the bound is not absurdly loose (within 2**8 of the max seen)."""
    model = random_autoencoder(kind, tiny=True, seed=4)
    net = StreamingWanDecoder.from_diffusers(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "gamma"):
                m.gamma.copy_(1 + 0.5 * torch.randn(m.gamma.shape, generator=g))
    bounds = norm_silu_bounds(net)
    assert len(bounds) == sum(n.endswith(("conv1", "conv2", "conv_out")) for n, _ in net.named_modules())
    seen = {}
    hooks = [net.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), args[0].abs().max().item())))
        for n in bounds]
    z = 3 * torch.randn(1, net.z_dim, 3, 2, 3, generator=g)
    with torch.no_grad():
        net.decode_chunk(z, net.new_state(1, 2, 3))
    for h in hooks:
        h.remove()
    assert seen.keys() == bounds.keys()
    for n, b in bounds.items():
        assert seen[n] <= b and seen[n] > b / 2 ** 8, (n, seen[n], b)
