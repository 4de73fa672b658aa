"""Time one generated chunk of the streaming engine (k denoising passes + 1 cache pass), DiT only, random weights.

Settings (the cache is filled to its full window before timing, so every timed chunk attends a full window):
  tiny               64x64, chunk 1, window 4 (sink 1), 4 steps             - CPU, float32
  wan2.1-1.3b        832x480, chunk 3, window 12 (sink 3), 4 steps [1000, 750, 500, 250] - GPU, bf16
  wan2.1-1.3b-2step  the same with the 2-step LoRA schedule [1000, 500]
  wan2.2-ti2v-5b     1280x704, chunk 8, window 32 (sink 8), 2 steps          - GPU, bf16
FPS = pixel frames per chunk (4 x latent frames, the VAE's temporal stride) / seconds per chunk.
Variants (all combinations run): --steps (eager, compile, cuda_graph, compile+cuda_graph: inference/chunk_step.py),
--linear (bf16, fp8: frozen E4M3 weights, activation quantization fused by compile, fp32-promoting GEMMs; fp8-fast:
the same with quant.fp8_fast_accum, the tensor cores' fast accumulator - the config default), --kv (bf16, nvfp4),
--attention (infer.attention: sdpa; fp8 = E4M3 Triton window attention over the BF16 cache; triton = the Triton
window kernel over the cache's own storage - BF16, or NVFP4 fused; cudnn-fp8 = cuDNN's FP8 kernel over an E4M3
shadow, split-KV where auto_splits picks it; cudnn-fp8-nosplit = the same in one key part).
Every variant's last chunk is compared with the eager bf16 one from the same noise (max abs diff, PSNR).

    python bench/bench_generate_chunk.py --settings tiny --out bench/results.jsonl
    python bench/bench_generate_chunk.py --settings wan2.1-1.3b wan2.2-ti2v-5b --steps eager compile+cuda_graph \
        --linear bf16 fp8 --profile --out bench/results.jsonl   # GPU
    python bench/bench_generate_chunk.py --settings wan2.1-1.3b wan2.1-1.3b-2step wan2.2-ti2v-5b \
        --steps compile+cuda_graph --attention sdpa fp8 --out bench/results.jsonl   # GPU: FP8 window attention
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profiling import top_kernels  # noqa: E402
from bench.record import record  # noqa: E402
from megatron_longlive.config import InferConfig, QuantConfig, preset_config  # noqa: E402
from megatron_longlive.inference.chunk_step import STEP_MODES  # noqa: E402
from megatron_longlive.inference.engine import StreamingEngine  # noqa: E402
from megatron_longlive.inference.window_attention import WINDOW_MODES  # noqa: E402
from megatron_longlive.quant.providers import convert_linears, freeze_for_inference  # noqa: E402
from megatron_longlive.models.wan import WanDiT  # noqa: E402

# name -> (preset, height, width, spatial stride, infer settings, result name)
SETTINGS = {
    "tiny": ("tiny", 64, 64, 8, dict(chunk_frames=1, window_frames=4, sink_frames=1,
                                     denoising_steps=[1000, 750, 500, 250]), "tiny 64px 4-step"),
    "wan2.1-1.3b": ("wan2.1-1.3b", 480, 832, 8, dict(chunk_frames=3, window_frames=12, sink_frames=3,
                                                      denoising_steps=[1000, 750, 500, 250]), "wan2.1-1.3b 480p 4-step"),
    "wan2.1-1.3b-2step": ("wan2.1-1.3b", 480, 832, 8, dict(chunk_frames=3, window_frames=12, sink_frames=3,
                                                            denoising_steps=[1000, 500]), "wan2.1-1.3b 480p 2-step"),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", 704, 1280, 16, dict(chunk_frames=8, window_frames=32, sink_frames=8,
                                                              denoising_steps=[1000, 500]), "wan2.2-5b 704p 2-step"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LINEARS = ("bf16", "fp8", "fp8-fast", "fp8-fast-ffn2-bf16", "fp8-fast-nofuse")
FFN2 = "blocks.*.ffn.2"


def linear_config(linear: str) -> QuantConfig:
    """A --linear choice -> its QuantConfig (fp8 = every GEMM promoting to fp32, as recorded before
    quant.fp8_fast_accum became the default; fp8-fast = the default fast-accumulating forward GEMMs;
    fp8-fast-ffn2-bf16 = the same with the FFN's second linear kept in BF16 (quant.keep_high_precision): its FP8
    input would be the GELU output, whose row-amax quantization costs about what the FP8 GEMM saves at 1.3B;
    fp8-fast-nofuse = fp8-fast without the fused GELU + quantization kernel of quant/fp8_ffn.py)."""
    cfg = QuantConfig(linear=linear.split("-")[0], fp8_fast_accum="-fast" in linear)
    if linear.endswith("-ffn2-bf16"):
        cfg.keep_high_precision = [*cfg.keep_high_precision, FFN2]
    return cfg


def build_model(name: str, device: torch.device, dtype: torch.dtype, linear: str) -> WanDiT:
    cfg = preset_config(SETTINGS[name][0])
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(cfg)
        model.init_weights()
        torch.nn.init.normal_(model.head.head.weight, std=0.02)   # Wan's init zeroes the head: outputs would all be 0
    model = model.to(dtype).eval()
    convert_linears(model, linear_config(linear))
    freeze_for_inference(model, fuse_gelu=not linear.endswith("-nofuse"))
    return model


def bench_variant(model: WanDiT, name: str, step: str, kv: str, device, timed: int, profile: bool,
                  attention: str = "sdpa") -> dict:
    _, height, width, stride, infer_kw, _ = SETTINGS[name]
    from megatron_longlive.inference.kernels import cudnn_fp8_attention as cfa

    cfa.kv_splits_override = 1 if attention == "cudnn-fp8-nosplit" else None
    attention = attention.removesuffix("-nosplit")
    infer = InferConfig(height=height, width=width, attention=attention, **infer_kw)
    engine = StreamingEngine(model, infer, (height // stride, width // stride), batch=1, kv_cache=kv, step=step)
    engine.set_prompt(torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(1)))
    shape = (1, *engine.latent_shape)
    gen = torch.Generator().manual_seed(0)
    warm = engine.layout.num_slots + 2           # fill sinks and window (+1 steady chunk: compile/capture)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(warm):
            engine.generate_chunk(torch.randn(shape, generator=gen).to(device))
        _sync(device)
        warm_s = time.perf_counter() - t0
        times, last = [], None
        for _ in range(timed):
            noise = torch.randn(shape, generator=gen).to(device)
            t0 = time.perf_counter()
            last = engine.generate_chunk(noise)
            _sync(device)
            times.append(time.perf_counter() - t0)
        kernels = []
        if profile:
            kernels = top_kernels(lambda: engine.generate_chunk(torch.randn(shape, device=device)), device)
    sec = sorted(times)[len(times) // 2]   # median
    frames = 4 * infer.chunk_frames
    out = dict(ms=sec * 1e3, fps=frames / sec, passes=len(infer.denoising_steps) + 1, warm_s=warm_s,
               tokens_per_chunk=engine.layout.tokens_per_chunk, kv_tokens=engine.layout.num_tokens,
               cache_gib=engine.cache.memory_bytes() / 2 ** 30, last=last.float().cpu(), kernels=kernels)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    peak = b.abs().max().item() ** 2
    return float("inf") if mse == 0 else 10 * math.log10(peak / mse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS),
                   help="default: tiny on CPU; the two full-size settings on CUDA")
    p.add_argument("--steps", nargs="+", default=["eager"], choices=STEP_MODES, help="chunk-step modes to time")
    p.add_argument("--linear", nargs="+", default=["bf16"], choices=LINEARS, help="linear precisions")
    p.add_argument("--kv", nargs="+", default=["bf16"], choices=("bf16", "nvfp4"), help="KV-cache kinds")
    p.add_argument("--attention", nargs="+", default=["sdpa"], choices=("sdpa", *WINDOW_MODES, "cudnn-fp8-nosplit"),
                   help="infer.attention values (self-attention over the KV window); cudnn-fp8-nosplit: cudnn-fp8 "
                        "with the keys in one part (no split-KV launch)")
    p.add_argument("--profile", action="store_true", help="print the top kernels of one chunk per variant")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--chunks", type=int, default=5, help="timed chunks (median reported)")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    settings = args.settings or (["wan2.1-1.3b", "wan2.2-ti2v-5b"] if device.type == "cuda" else ["tiny"])
    rows = []
    for name in settings:
        label = SETTINGS[name][5]
        reference = None
        for linear in args.linear:
            model = build_model(name, device, dtype, linear)
            for kv, attention in ((kv, att) for kv in args.kv for att in args.attention):
                if kv == "nvfp4" and attention == "fp8":
                    continue                     # fp8 quantizes a BF16 window; the NVFP4 cache has its own kernel
                for step in args.steps:
                    try:
                        r = bench_variant(model, name, step, kv, device, args.chunks, args.profile, attention)
                    except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                        print(f"[{name} {step} linear={linear} kv={kv} attention={attention}] FAILED: "
                              f"{type(e).__name__}: {e}", flush=True)
                        continue
                    if reference is None:
                        reference = r["last"]
                    r.update(setting=name, step=step, linear=linear, kv=kv, attention=attention,
                             dtype=str(dtype).replace("torch.", ""),
                             max_diff=(r["last"] - reference).abs().max().item(), psnr=psnr(r["last"], reference))
                    rows.append(r)
                    variant = f"{step}, linear {linear}, kv {kv}" + (f", attention {attention}" if attention != "sdpa" else "")
                    extra = dict(setting=name, dtype=r["dtype"], passes=r["passes"], kv_tokens=r["kv_tokens"],
                                 cache_gib=round(r["cache_gib"], 3), step=step, linear=linear, kv=kv,
                                 attention=attention, max_abs_diff_vs_first_variant=r["max_diff"])
                    record(args.out, f"{label} dit fps ({variant})", "fps", round(r["fps"], 3), "frames/s", **extra)
                    record(args.out, f"{label} chunk ms ({variant})", "chunk_time", round(r["ms"], 3), "ms", **extra)
                    print(f"[{name} {variant}] {r['ms']:.1f} ms/chunk, {r['fps']:.1f} FPS, warm-up {r['warm_s']:.1f} s, "
                          f"max|diff| vs first {r['max_diff']:.3g} (PSNR {r['psnr']:.1f} dB)", flush=True)
                    for k, ms, calls in r["kernels"]:
                        print(f"    {ms:9.2f} ms {calls:6d}x  {k[:110]}")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'setting':<19}{'step':<20}{'linear':<20}{'kv':<7}{'attn':<10}{'passes':>7}{'q tok':>7}{'kv tok':>8}{'cache GiB':>10}"
          f"{'ms/chunk':>10}{'DiT FPS':>9}{'PSNR vs 1st':>12}")
    for r in rows:
        print(f"{r['setting']:<19}{r['step']:<20}{r['linear']:<20}{r['kv']:<7}{r['attention']:<10}{r['passes']:>7}{r['tokens_per_chunk']:>7}"
              f"{r['kv_tokens']:>8}{r['cache_gib']:>10.3f}{r['ms']:>10.2f}{r['fps']:>9.1f}{r['psnr']:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
