"""Single-conv speed of the FP8 implicit-GEMM conv (quant/fp8_conv) vs cuDNN BF16 `F.conv3d`, channels-last.

The shapes are the distinct convs of the real Wan2.2 (or Wan2.1) decoder for a decoder call of `--frames` latent
frames at `--latent` size (default 4 frames of 44x80 = 1280x704: StreamingVAEDecoder's sub-chunk of an 8-frame
chunk), temporal convs with their 2 cached frames. Per shape: cuDNN BF16 ms and TFLOP/s, FP8 ms and TFLOP/s for
the whole op with a dynamic scale (amax + quantize + GEMM), ms with a static scale (quantize + GEMM: the convs fed
by silu(RMSNorm), marked *), TFLOP/s of the GEMM alone, the share of the quantize passes (dynamic), the speedup
x = bf16 / fp8 as the decoder runs it, and the relative RMS difference FP8 vs BF16. The last line weighs each
shape by how often the decoder runs it: the conv time of one decoder call, all BF16 vs FP8 where the default
rule (module.by_roofline) picks it.

    python bench/bench_fp8_conv.py                       # one H100, ~1 min
    python bench/bench_fp8_conv.py --kind wan2.1 --latent 60 104 --frames 3
    TRITON_INTERPRET=1 python bench/bench_fp8_conv.py --smoke   # CPU: tiny config, checks that it runs
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longlive.models.wan.vae import WanVAE  # noqa: E402
from megatron_longlive.models.wan.vae_decoder import CausalConv3d, StreamingWanDecoder  # noqa: E402
from megatron_longlive.quant.fp8_conv import ops  # noqa: E402
from megatron_longlive.quant.fp8_conv.module import by_roofline  # noqa: E402
from megatron_longlive.quant.fp8_conv.reference import layout, quantize_weight  # noqa: E402


def conv_shapes(kind: str, tiny: bool, frames: int, h: int, w: int):
    """[(name, count, kernel, cin, cout, input shape [1, cin, T, H, W], fp8 by the default rule)] of the decoder."""
    with torch.device("meta"):
        net = StreamingWanDecoder(WanVAE.config_for(kind, tiny=tiny))
    rule, seen = by_roofline(), collections.OrderedDict()
    for name, m in net.named_modules():
        if not isinstance(m, CausalConv3d):
            continue
        kernel = tuple(m.weight.shape[2:])
        shape = (1, m.in_dim, m.tscale * frames + kernel[0] - 1, h * m.scale, w * m.scale)
        key = (kernel, m.in_dim, m.out_dim, shape)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [name, 1, rule(name, m)]
    return [(name, count, *key, fp8) for key, (name, count, fp8) in seen.items()]


def _time(fn, device, reps: int) -> float:
    """Median milliseconds of fn() over reps (CUDA events), after one warm-up call (autotuning, cuDNN plans)."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="wan2.2", choices=["wan2.1", "wan2.2"])
    p.add_argument("--latent", nargs=2, type=int, default=[44, 80], metavar=("H", "W"))
    p.add_argument("--frames", type=int, default=4, help="latent frames per decoder call")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny config, 1x2 latents, 1 frame (CPU interpreter)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 --smoke")
    if args.smoke:
        args.latent, args.frames, args.reps = [1, 2], 1, 1
    h, w = args.latent
    shapes = conv_shapes(args.kind, args.smoke, args.frames, h, w)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{args.kind} decoder convs, {args.frames} latent frames at {h}x{w} latents, {dev_name}")
    print(f"{'conv':<44}{'n':>3} {'kernel':<8}{'cin':>5}{'cout':>5} {'T,H,W in':<14}"
          f"{'bf16 ms':>9}{'TF/s':>6}{'fp8 ms':>9}{'TF/s':>6}{'static':>8}{'gemm TF/s':>10}{'quant%':>7}{'x':>6}"
          f"{'rms':>8}")
    total_bf16 = total_mix = 0.0
    g = torch.Generator(device=device).manual_seed(0)
    for name, count, kernel, cin, cout, shape, fp8_rule in shapes:
        x = torch.randn(*shape, device=device, generator=g, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        wt = (torch.randn(cout, cin, *kernel, device=device, generator=g) / (cin * kernel[0] * kernel[1] * kernel[2])
              ** 0.5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        bias = torch.randn(cout, device=device, generator=g).to(torch.bfloat16)
        pad = (0, kernel[1] // 2, kernel[2] // 2)
        w_q, w_s = quantize_weight(wt)
        bias32 = bias.float()
        lay = layout(x, kernel)
        flops = 2.0 * cin * cout * kernel[0] * kernel[1] * kernel[2] * lay.t_out * lay.h * lay.w
        with torch.inference_mode():
            y16 = F.conv3d(x, wt, bias, padding=pad)
            y8 = ops.conv3d_fp8(x, w_q, w_s, bias32, kernel)
            rms = ((y8.float() - y16.float()).pow(2).mean() / y16.float().pow(2).mean()).sqrt().item()
            y16 = y8 = None
            t16 = _time(lambda: F.conv3d(x, wt, bias, padding=pad), device, args.reps)
            t8 = _time(lambda: ops.conv3d_fp8(x, w_q, w_s, bias32, kernel), device, args.reps)
            bound = x.abs().amax().float()
            t8s = _time(lambda: ops.conv3d_fp8(x, w_q, w_s, bias32, kernel, bound), device, args.reps)
            buf, amax = ops.quantize_activation(x, kernel)
            out = torch.empty((1, cout, lay.t_out, lay.h, lay.w), dtype=x.dtype, device=device,
                              memory_format=torch.channels_last_3d)
            tg = _time(lambda: ops.launch_conv(buf, amax, w_q, w_s, bias32, out, lay, ops._tma_ok(x)), device,
                       args.reps)
            buf = out = None
        total_bf16 += count * t16
        static = name.endswith(("conv1", "conv2", "conv_out"))   # module.norm_silu_bounds' convs
        t_dec = t8s if static else t8
        total_mix += count * (t_dec if fp8_rule else t16)
        thw = ",".join(str(v) for v in shape[2:])
        print(f"{name[-43:]:<44}{count:>3} {'x'.join(map(str, kernel)):<8}{cin:>5}{cout:>5} {thw:<14}"
              f"{t16:>9.2f}{flops / t16 / 1e9:>6.0f}{t8:>9.2f}{flops / t8 / 1e9:>6.0f}"
              f"{t8s:>7.2f}{'*' if static else ' '}{flops / tg / 1e9:>10.0f}"
              f"{100 * (t8 - tg) / t8:>7.0f}{t16 / t_dec:>6.2f}{rms:>8.4f}{'' if fp8_rule else '  (rule: bf16)'}")
        x = wt = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"one decoder call, conv time: bf16 {total_bf16:.1f} ms, fp8 (default rule) {total_mix:.1f} ms "
          f"-> {total_bf16 / total_mix:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
