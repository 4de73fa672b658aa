"""GPU lane, FP8 VAE convs (quant/fp8_conv): the compiled quantizer (hardware E4M3 cast) bitwise equal to the torch
reference; the autotuned TMA implicit-GEMM conv equal to a float64 conv of the same dequantized E4M3 operands
(the Hopper FP8 accumulator's tolerance plus one bf16 rounding, and a relative norm error) at real Wan2.2 decoder shapes; the full Wan2.2 decoder
(random weights) with the default FP8 rule: PSNR vs float32 and vs BF16 above a floor, and its CUDA-graph replay
bitwise equal to the eager decode.

Run through `device`: python -m pytest -q -m gpu tests/gpu/test_fp8_conv_gpu.py -s   (~1 min on one H100)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.gpu_helpers import bytes_differ

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs FP8 tensor cores (sm89+)")]

# (kernel, x [N, C, T, H, W], Cout): Wan2.2 decoder convs at 44x80 latents (scaled down in T or H, W to keep the
# float64 reference quick), plus ragged ones (C = 96 not a multiple of BLOCK_K 128, odd H/W, Cout 200)
SHAPES = [((3, 3, 3), (1, 1024, 4, 44, 80), 1024),
          ((3, 1, 1), (1, 1024, 4, 44, 80), 2048),
          ((1, 3, 3), (1, 512, 2, 88, 160), 512),
          ((3, 3, 3), (1, 256, 4, 176, 320), 256),
          ((1, 1, 1), (1, 512, 2, 88, 160), 256),
          ((3, 3, 3), (2, 96, 5, 37, 51), 200),
          ("up2x", (1, 1024, 2, 88, 160), 1024),   # nearest 2x + 1x3x3 as 2x2 phase kernels (NearestUp2xConv)
          ("up2x", (1, 96, 3, 37, 51), 200)]
PSNR_FLOOR_DB = 20.0  # conservative first floor (random weights); the measured values are printed (-s)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.mark.parametrize("kernel,shape,cout", SHAPES)
def test_fp8_conv_vs_float64_reference(kernel, shape, cout):
    from megatron_longlive.models.wan.vae_decoder import interleave_phases, nearest_up2x_phase_weights
    from megatron_longlive.quant.fp8_conv import ops
    from megatron_longlive.quant.fp8_conv import reference as ref

    up2x = kernel == "up2x"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(cout, shape[1], *((1, 3, 3) if up2x else kernel), device="cuda", generator=g)
    w = w / w[0].numel() ** 0.5
    bias = torch.randn(cout, device="cuda", generator=g)
    if up2x:
        w, bias, kernel = nearest_up2x_phase_weights(w), bias.repeat(4), (1, 2, 2)
    w_q, w_s = ref.quantize_weight(w)
    # quantizer: the compiled kernel (hardware cvt) vs torch's float8 cast
    buf, amax = ops.quantize_activation(x, kernel)
    want_buf, scale = ref.quantize_activation(x, kernel)
    assert (msg := bytes_differ(buf, want_buf)).startswith("0 of"), msg
    assert amax.view(torch.float32) == x.float().abs().max()
    # conv: autotuned TMA kernel vs float64 conv of the dequantized operands
    y = ops.conv3d_fp8(x, w_q, w_s, bias, kernel, up2x=up2x)
    want = ref.conv3d_reference(x, w_q, w_s, bias, kernel, up2x=up2x)
    lay = ref.layout(x, kernel)
    bound = F.conv3d((ref.unpad_activation(want_buf, lay).double() * scale.double()).abs(),
                     ref.dequantize_weight(w_q, w_s, lay.c, kernel).abs(), bias.double().abs(),
                     padding=(0, lay.ph, lay.pw))
    if up2x:
        bound = interleave_phases(bound, cout, lay.h, lay.w)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
    err = (y.double() - want).abs()
    # Hopper's FP8 MMA adds into its accumulator with ~14 significant bits (DeepSeek-V3 tech report, 3.3.2; Triton
    # keeps the whole K loop in it on sm90): measured max (err - bf16 rounding) / bound 2.2e-4..5.8e-4 at these
    # shapes, so the elementwise budget is 2**-9 of the absolute-product sum (fp32 accumulation would be ~1e-6).
    # That alone would admit a wrong tap (1/taps of the terms, ~1/sqrt(K) of the bound per element), which the
    # relative norm error catches: ~sqrt(2 / taps) >= 0.27 for a wrong tap of a 3x3x3 conv vs the noise's measured
    # 1.7e-3..3.5e-3 (H100, 2026-12-06).
    tol = 2.0 ** -9 * bound + want.abs() * 2.0 ** -8
    rel = ((y.double() - want).norm() / want.norm()).item()
    print(f"{kernel} {shape}->{cout}: max err / bound {(err / bound).max().item():.3g}, "
          f"max (err - bf16 rounding) / bound {((err - want.abs() * 2.0 ** -8).clamp_min(0) / bound).max().item():.3g}, "
          f"max err {err.max().item():.3g}, max |want| {want.abs().max().item():.3g}, max bound {bound.max().item():.3g}, "
          f"relative norm error {rel:.3g}")
    assert torch.all(err <= tol), f"worst excess {(err - tol).max().item():.3g}, max err {err.max().item():.3g}"
    assert rel <= 3e-2, rel
    assert torch.equal(ops.conv3d_fp8(x, w_q, w_s, bias, kernel, up2x=up2x), y)   # deterministic


def test_wan22_decoder_fp8_psnr_and_cuda_graph():
    from megatron_longlive.models.wan.vae_decoder import StreamingVAEDecoder, random_autoencoder
    from megatron_longlive.quant.fp8_conv.module import FP8CausalConv3d

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = random_autoencoder("wan2.2", device="cuda", dtype=torch.float32, seed=0)
    z = torch.randn(1, 48, 5, 16, 24, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    chunks = [z[:, :, :1], z[:, :, 1:3], z[:, :, 3:5]]
    with torch.inference_mode():
        f32_dec = StreamingVAEDecoder(model, "cuda", torch.float32)     # one decoder: one clip, chunk by chunk
        f32 = torch.cat([f32_dec.decode(c) for c in chunks], 2)
    with torch.inference_mode():
        bf16_dec = StreamingVAEDecoder(model, "cuda", torch.bfloat16)
        bf16 = torch.cat([bf16_dec.decode(c) for c in chunks], 2)
        fp8_dec = StreamingVAEDecoder(model, "cuda", torch.bfloat16, conv_precision="fp8")
        n_fp8 = sum(isinstance(m, FP8CausalConv3d) for m in fp8_dec.net.modules())
        fp8 = torch.cat([fp8_dec.decode(c) for c in chunks], 2)
        graph_dec = StreamingVAEDecoder(model, "cuda", torch.bfloat16, conv_precision="fp8", cuda_graph=True)
        graph = torch.cat([graph_dec.decode(c) for c in chunks], 2)
        # compiled: the inputs' quantization runs inside Inductor's producing kernels (ops.quantize_activation_torch)
        comp_dec = StreamingVAEDecoder(model, "cuda", torch.bfloat16, conv_precision="fp8", compile=True,
                                       cuda_graph=True)
        comp = torch.cat([comp_dec.decode(c) for c in chunks], 2)
    torch.backends.cudnn.allow_tf32 = True
    p8, p8_16, p16, pc = psnr(fp8, f32), psnr(fp8, bf16), psnr(bf16, f32), psnr(comp, fp8)
    print(f"\nwan2.2 decoder, {n_fp8} FP8 convs: fp8 vs fp32 {p8:.1f} dB, fp8 vs bf16 {p8_16:.1f} dB, "
          f"bf16 vs fp32 {p16:.1f} dB, compiled fp8 vs eager fp8 {pc:.1f} dB, vs fp32 {psnr(comp, f32):.1f} dB")
    assert n_fp8 >= 20 and fp8.shape == f32.shape and torch.isfinite(fp8).all()
    assert p8 >= PSNR_FLOOR_DB and p8_16 >= PSNR_FLOOR_DB
    assert torch.equal(graph, fp8), "CUDA-graph replay differs from the eager FP8 decode"
    # compiled vs eager differ by Inductor's BF16 rounding in the norms, which moves some E4M3 codes by one step:
    # quantization noise of the same size as FP8 vs BF16, so the same floor
    assert psnr(comp, f32) >= PSNR_FLOOR_DB and pc >= PSNR_FLOOR_DB
