"""Streaming VAE decode FPS: our chunk decoder vs diffusers' `AutoencoderKLWan.decode`, same run, random weights.

Settings (BF16, batch 1):
  wan2.1  832x480  (latents 60x104), streaming chunks of 3 latent frames (12 pixel frames)
  wan2.2  1280x704 (latents 44x80),  streaming chunks of 8 latent frames (32 pixel frames)
Ours: steady-state chunks (the clip's first chunk and `--warmup` chunks run first, untimed), variants
  eager | graph (eager + one CUDA graph per chunk shape) | compile (torch.compile) | compile+graph.
diffusers: full-clip `decode` of 1 + k * --chunks latent frames (it loops frame by frame itself).
FPS = pixel frames / seconds, CUDA-synchronized. Also: BF16 PSNR vs float32 (our float32 decode equals
diffusers' within 1e-4, tests/unit/test_vae_decoder.py), and with --encoder the diffusers encoder's FPS.
--conv bf16 fp8 times every variant twice, with the decoder's convs in BF16 and in FP8 (quant/fp8_conv; rows
"<variant>+fp8"), and prints the FP8 decode's PSNR vs BF16 and vs float32 on the same chunks.

    python bench/bench_vae.py --out bench/results.jsonl                       # GPU, < 4 min on one H100
    python bench/bench_vae.py --variants graph compile+graph --conv bf16 fp8 --chunks 3 --no-diffusers  # ~2 min
    python bench/bench_vae.py --kinds wan2.1 --variants eager --chunks 2 --tiny   # CPU smoke run
    TRITON_INTERPRET=1 python bench/bench_vae.py --tiny --kinds wan2.1 --variants eager --conv bf16 fp8 \\
        --chunks 1 --warmup 0 --no-diffusers --no-psnr                  # CPU smoke run of the FP8 path
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profiling import print_kernels, top_kernels  # noqa: E402
from bench.record import record  # noqa: E402
from megatron_longlive.models.wan.vae_decoder import StreamingVAEDecoder, random_autoencoder  # noqa: E402

# kind -> (label, latent h, latent w, chunk latent frames)
SETTINGS = {"wan2.1": ("480p", 60, 104, 3), "wan2.2": ("704p", 44, 80, 8)}
TINY_SETTINGS = {"wan2.1": ("tiny", 4, 6, 2), "wan2.2": ("tiny", 2, 4, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` synchronized runs."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of `a` against `b`, both in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def _fp8_select(tiny: bool):
    """The default roofline rule, or every conv for the tiny smoke configs (all too narrow for the rule)."""
    return (lambda name, conv: True) if tiny else None


# --conv choices: conv format, and for FP8 the GEMM schedules its autotuner may pick (quant/fp8_conv/ops.py)
_USER_SCHEDULE = os.environ.get("MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT")
CONV_FORMATS = {"bf16": ("bf16", None), "fp8": ("fp8", None), "fp8-tile": ("fp8", "off"),
                "fp8-persistent": ("fp8", "on"), "fp8-auto": ("fp8", "auto")}


def bench_ours(model, z: torch.Tensor, k: int, variant: str, device, dtype, warmup: int, chunks: int,
               conv: str = "bf16", tiny: bool = False, profile: bool = False) -> float:
    conv, schedule = CONV_FORMATS[conv]
    schedule = schedule or _USER_SCHEDULE             # plain fp8: the caller's environment, else the default (auto)
    if schedule is None:
        os.environ.pop("MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT", None)
    else:
        os.environ["MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT"] = schedule
    dec = StreamingVAEDecoder(model, device=device, dtype=dtype, compile="compile" in variant,
                              cuda_graph="graph" in variant, conv_precision=conv, fp8_select=_fp8_select(tiny))
    dec.decode(z[:, :, :k])  # the clip's first chunk (eager)
    steady = z[:, :, k:2 * k]
    for _ in range(warmup):  # compile / capture / cuDNN autotune
        dec.decode(steady)
    seconds = _timed(lambda: [dec.decode(steady) for _ in range(chunks)], device, 1)
    if profile:
        rows = top_kernels(lambda: dec.decode(steady), device, n=20)
        print_kernels(f"one steady chunk, {variant}, {conv} convs", rows, 1e3 * seconds / chunks)
    dec = None  # free the GPU memory now (a rebinding: the timing lambda closes over the name)
    return chunks * 4 * k / seconds


def bench_kind(kind: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    label, h, w, k = (TINY_SETTINGS if args.tiny else SETTINGS)[kind]
    model = random_autoencoder(kind, tiny=args.tiny, device=device, dtype=dtype, seed=0, with_encoder=args.encoder)
    g = torch.Generator(device=device).manual_seed(0)
    num_latent = 1 + k * args.chunks
    z = torch.randn(1, model.config.z_dim, num_latent, h, w, device=device, generator=g, dtype=dtype)
    rows, fps = [], {}
    with torch.inference_mode():
        if args.diffusers:  # full clip (raw latents; the normalization is a per-channel affine map, negligible)
            model.decode(z[:, :, :1 + k])  # warm-up
            frames = 1 + 4 * (num_latent - 1)
            fps["diffusers"] = frames / _timed(lambda: model.decode(z), device, args.repeats)
        for conv in args.conv:
            for variant in args.variants:
                if "graph" in variant and device.type != "cuda":
                    continue
                name = variant if conv == "bf16" else f"{variant}+{conv}"
                fps[name] = bench_ours(model, z, k, variant, device, dtype, args.warmup, args.chunks, conv, args.tiny,
                                       args.profile)
        if args.psnr:
            ref = StreamingVAEDecoder(model, device=device, dtype=torch.float32)
            low = StreamingVAEDecoder(model, device=device, dtype=dtype)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 ref
            kk = min(k, 3)  # float32 activations of an 8-frame 704p chunk would need ~2x the bf16 memory
            p8 = None
            if any(c.startswith("fp8") for c in args.conv):
                fp8 = StreamingVAEDecoder(model, device=device, dtype=dtype, conv_precision="fp8",
                                          fp8_select=_fp8_select(args.tiny))
                outs = [(low.decode(z[:, :, s:s + kk]), ref.decode(z[:, :, s:s + kk].float()),
                         fp8.decode(z[:, :, s:s + kk])) for s in (0, kk)]
                p = min(psnr(lo, r) for lo, r, _ in outs)
                p8 = (min(psnr(f, lo) for lo, _, f in outs), min(psnr(f, r) for _, r, f in outs))
                del fp8, outs
            else:
                p = min(psnr(low.decode(z[:, :, s:s + kk]), ref.decode(z[:, :, s:s + kk].float())) for s in (0, kk))
            del ref, low
            torch.backends.cudnn.allow_tf32 = True
        enc_fps = None
        if args.encoder:
            video = torch.rand(1, 3, 1 + 4 * k, h * model.config.scale_factor_spatial,
                               w * model.config.scale_factor_spatial, device=device, dtype=dtype) * 2 - 1
            model.encode(video[:, :, :5])
            enc_fps = video.shape[2] / _timed(lambda: model.encode(video), device, args.repeats)
    ours = [v for v in fps if v != "diffusers"]
    if not ours:
        print(f"{kind}: none of the variants {args.variants} runs on {device} (CUDA-graph variants need CUDA)")
        return []
    best = max(ours, key=fps.get)
    best_bf16 = max((v for v in ours if "+" not in v), key=fps.get, default=None)
    name = f"{kind} vae {label}"
    print(f"\n{name}: chunk {k} latent frames ({4 * k} px frames), {h}x{w} latents, {dtype}, {record_device()}")
    print(f"  {'decoder':<20}{'FPS':>10}{'x diffusers':>14}{'x bf16 same variant':>22}")
    for v, f in fps.items():
        vs_diff = f"{f / fps['diffusers']:>14.2f}" if "diffusers" in fps else f"{'-':>14}"
        base = v.split("+")[0]
        vs_bf16 = f"{f / fps[base]:>22.2f}" if "+" in v and base in fps else f"{'':>22}"
        print(f"  {v:<20}{f:>10.1f}{vs_diff}{vs_bf16}")
        rows.append(record(args.out, f"{name} decode fps ({v})", "fps", round(f, 2), "frames/s", chunk=k,
                           variant=v, dtype=str(dtype)))
    if best_bf16 is not None:  # the headline rows stay BF16 (comparable with earlier sessions)
        rows.append(record(args.out, f"{name} decode fps", "fps", round(fps[best_bf16], 2), "frames/s", chunk=k,
                           variant=best_bf16))
        if "diffusers" in fps:
            rows.append(record(args.out, f"{name} decode speedup vs diffusers", "speedup",
                               round(fps[best_bf16] / fps["diffusers"], 3), "x", variant=best_bf16,
                               ours_fps=round(fps[best_bf16], 2), diffusers_fps=round(fps["diffusers"], 2)))
    if best != best_bf16:
        rows.append(record(args.out, f"{name} decode fps (best, any conv format)", "fps", round(fps[best], 2),
                           "frames/s", chunk=k, variant=best))
        if "diffusers" in fps:
            rows.append(record(args.out, f"{name} decode speedup vs diffusers (best, any conv format)", "speedup",
                               round(fps[best] / fps["diffusers"], 3), "x", variant=best,
                               ours_fps=round(fps[best], 2), diffusers_fps=round(fps["diffusers"], 2)))
    if args.psnr:
        print(f"  bf16 vs float32 PSNR: {p:.1f} dB (random weights, first + second chunk)")
        rows.append(record(args.out, f"{name} decode bf16 psnr vs fp32", "psnr", round(p, 2), "dB"))
        if p8 is not None:
            print(f"  fp8 convs: PSNR {p8[0]:.1f} dB vs bf16, {p8[1]:.1f} dB vs float32 (same chunks)")
            rows.append(record(args.out, f"{name} decode fp8 psnr vs bf16", "psnr", round(p8[0], 2), "dB"))
            rows.append(record(args.out, f"{name} decode fp8 psnr vs fp32", "psnr", round(p8[1], 2), "dB"))
    if enc_fps is not None:
        print(f"  diffusers encoder: {enc_fps:.1f} FPS ({1 + 4 * k} frames)")
        rows.append(record(args.out, f"{name} encode fps (diffusers)", "fps", round(enc_fps, 2), "frames/s"))
    model = None  # free the GPU memory before the next kind
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def record_device() -> str:
    from bench.record import device_name

    return device_name()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["wan2.1", "wan2.2"], choices=sorted(SETTINGS))
    p.add_argument("--variants", nargs="+", default=["eager", "graph", "compile+graph"],
                   choices=["eager", "graph", "compile", "compile+graph"])
    p.add_argument("--chunks", type=int, default=4, help="timed steady-state chunks (and diffusers clip length)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steady-state chunks per variant")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of the diffusers decode (median)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-psnr", dest="psnr", action="store_false", help="skip the bf16-vs-float32 PSNR")
    p.add_argument("--encoder", action="store_true", help="also time the (diffusers) encoder")
    p.add_argument("--conv", nargs="+", default=["bf16"], choices=sorted(CONV_FORMATS),
                   help="conv formats to time each variant with (fp8: quant/fp8_conv, sm89+ or TRITON_INTERPRET=1; "
                        "fp8-tile / fp8-persistent / fp8-auto: its GEMM as one tile per program / one program per SM / "
                        "autotuned over both schedules, the default)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false",
                   help="skip timing diffusers' decode (saves ~10-30 s a kind on a GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny configs at tiny sizes (CPU smoke test)")
    p.add_argument("--profile", action="store_true",
                   help="print the top device kernels of one steady chunk per variant (profile a variant without "
                        "'graph': kernels replayed from a CUDA graph may not be attributed)")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "fp8" in args.conv and os.environ.get("TRITON_INTERPRET") == "1":
        from megatron_longlive.quant.fp8_conv import ops

        ops.INTERPRET_TILE = (512, 32, 16)  # few big programs: the interpreter's cost is per program
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    args.psnr = args.psnr and dtype != torch.float32  # float32 vs float32 says nothing
    for kind in args.kinds:
        bench_kind(kind, args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
