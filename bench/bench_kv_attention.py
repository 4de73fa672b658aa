"""Streaming self-attention over the KV window: BF16 SDPA (cuDNN, flash backends) vs the Triton kernels - the
window attention kernel (inference/kernels/window_attention_triton.py) in its bf16, fp8 and nvfp4 modes and the
older split-P NVFP4-KV kernel - plus the KV cache memory of BF16 vs NVFP4.

Variants (--variants): cudnn, flash (SDPA backends, BF16 K/V); bf16-triton (window kernel, BF16 K/V); fp8-triton
(window kernel on pre-quantized E4M3 q/K/V: the kernel alone), fp8-triton+quant (the fused quantizer of q, K, V
plus the kernel: what infer.attention=fp8 costs per call), fp8-quant (the quantizer alone); nvfp4-triton (window
kernel over the packed NVFP4 window: the NVFP4 cache's fused mode); cudnn-fp8 (infer.attention=cudnn-fp8 per
call: q's E4M3 pass, cuDNN's FP8 kernel over the E4M3 shadow, V's per-head scales), cudnn-fp8-kernel (the cuDNN
FP8 kernel and its output pass; needs nvidia-cudnn-frontend), both with the keys cut in parts where auto_splits
finds that the query tiles fill the SMs' waves better, and cudnn-fp8-nosplit, cudnn-fp8-kernel-nosplit (one key
part); nvfp4-old, nvfp4-old-split (the older kernel,
tiles from --tiles). Every window-kernel variant prints its error vs the cuDNN output on the same BF16 K/V
(relative Frobenius and max |diff| / max |ref|); the window kernel is autotuned (first call, not timed).

Settings (one chunk of queries against sinks + window + itself, one layer's attention, batch 1):
  wan2.1-1.3b 480p: Q 3 latent frames x 1560 = 4680 tokens, KV 12 frames = 18720, 12 heads, d 128, 30 layers
  wan2.2-5b   704p: Q 7040, KV 28160, 24 heads, d 128, 30 layers
and growing windows (1, 2, 4, 8 and 16 chunks of KV). FLOP model: 4 * Sq * Skv * H * D per attention call
(QK^T and PV, 2 FLOPs per multiply-add; the old NVFP4 kernel's second P@V pass (split_p) is not counted; the
fp8-triton+quant row counts the same FLOPs over the kernel + quantizer time).
Share of peak: against the dense BF16 tensor-core peak given by --peak-tflops (H100 SXM: 989).
Cache memory: K + V of all layers over the whole window, BF16 vs NVFP4 (codes + E4M3 scales + FP32 per chunk).
Prints a table; appends JSON lines (bench/record.py) to --out.

  python bench/bench_kv_attention.py --out bench/results.jsonl        # needs CUDA
  python bench/bench_kv_attention.py --no-growing --variants cudnn bf16-triton fp8-triton fp8-triton+quant \
      fp8-quant nvfp4-triton --out bench/results.jsonl                 # the window kernel, ~1-2 min on an H100
  python bench/bench_kv_attention.py --smoke                          # CPU, TRITON_INTERPRET, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_fp8_linear import cuda_time_ms  # noqa: E402
from bench.record import record  # noqa: E402

# name: (query tokens = tokens per chunk, window chunks incl. sink and current, heads, head dim, layers)
SETTINGS = {"wan2.1-1.3b 480p": (4680, 4, 12, 128, 30), "wan2.2-5b 704p": (7040, 4, 24, 128, 30)}
GROWING = [1, 2, 4, 8, 16]


def packed_window(tpc: int, chunks: int, heads: int, d: int, device: str):
    """A PackedKV of `chunks` regions of random K/V, quantized chunk by chunk like the cache does."""
    from megatron_longlive.inference.kv_cache import CacheLayout
    from megatron_longlive.quant.nvfp4.kv_cache import NVFP4KVCache

    cache = NVFP4KVCache(CacheLayout(0, 0, chunks - 1, tpc), 1, 1, heads, d, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for c in range(chunks):
        k, v = (torch.randn(1, tpc, heads, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
        cache.hook(0)(k, v, None)
        if c < chunks - 1:
            cache.append(c)
    return cache


def cache_bytes(tpc: int, chunks: int, heads: int, d: int, layers: int) -> tuple[int, int]:
    """(BF16, NVFP4) bytes of K + V for all layers over `chunks` regions (formula of kv_cache.NVFP4KVCache)."""
    values = 2 * layers * chunks * tpc * heads * d
    return values * 2, values // 2 + values // 16 + 2 * layers * chunks * 4


def sdpa_ms(q, k, v, backend, warmup, iters) -> float | None:
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    try:
        with sdpa_kernel([backend]):
            return cuda_time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup, iters)
    except RuntimeError as e:                           # backend not available for this shape/device
        print(f"  {backend}: unavailable ({str(e).splitlines()[0][:80]})")
        return None


CUDNN_FP8 = ("cudnn-fp8", "cudnn-fp8-kernel", "cudnn-fp8-nosplit", "cudnn-fp8-kernel-nosplit")
NEW = ("bf16-triton", "fp8-triton", "fp8-triton+quant", "fp8-quant", "nvfp4-triton", *CUDNN_FP8)
# outputs not comparable with the attention (codes, V-code units)
NO_ERROR = ("fp8-quant", "cudnn-fp8-kernel", "cudnn-fp8-kernel-nosplit")
VARIANTS = ("cudnn", "flash", *NEW, "nvfp4-old", "nvfp4-old-split")


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max |diff| / max |ref|) of out vs ref."""
    diff = (out.float() - ref.float())
    return (diff.norm() / ref.float().norm()).item(), (diff.abs().max() / ref.float().abs().max()).item()


def window_variants(q, k, v, kv, tpc: int, variants) -> dict:
    """label -> zero-argument callable of each requested window-kernel variant (K/V: the BF16 window k, v and
    its packed NVFP4 form kv)."""
    from megatron_longlive.inference.kernels.window_attention_triton import quantize_fp8, window_attention

    fns = {}
    if "bf16-triton" in variants:
        fns["bf16-triton"] = lambda: window_attention(q, k, v, tpc, mode="bf16")
    if {"fp8-triton", "fp8-triton+quant", "fp8-quant"} & set(variants):
        q8, qs, k8, ks, v8, vs = quantize_fp8(q, k, v)
        if "fp8-triton" in variants:
            fns["fp8-triton"] = lambda: window_attention(q8, k8, v8, tpc, mode="fp8", q_scale=qs, k_scale=ks,
                                                         v_scale=vs, out_dtype=q.dtype)
        if "fp8-triton+quant" in variants:
            def fp8_with_quant():
                a = quantize_fp8(q, k, v)
                return window_attention(a[0], a[2], a[4], tpc, mode="fp8", q_scale=a[1], k_scale=a[3], v_scale=a[5],
                                        out_dtype=q.dtype)
            fns["fp8-triton+quant"] = fp8_with_quant
        if "fp8-quant" in variants:
            fns["fp8-quant"] = lambda: quantize_fp8(q, k, v)
    if set(CUDNN_FP8) & set(variants):
        fns.update(cudnn_fp8_variants(q, k, v, tpc, variants))
    if "nvfp4-triton" in variants:
        fns["nvfp4-triton"] = lambda: window_attention(q, kv.k_codes, kv.v_codes, tpc, mode="nvfp4",
                                                       k_scale=kv.k_scales, v_scale=kv.v_scales, k_ts=kv.k_ts,
                                                       v_ts=kv.v_ts)
    return fns


def cudnn_fp8_variants(q, k, v, tpc: int, variants) -> dict:
    """infer.attention=cudnn-fp8 per call (cudnn-fp8: q's E4M3 pass + cuDNN's FP8 kernel over the cache's E4M3
    shadow + the per-head V scales; the shadow is written once per chunk, outside the call) and the kernel alone.
    The static q/K scales here are the data's amax * 1.02 (the engine derives them from the qk-norm gains)."""
    from megatron_longlive.inference.fp8_kv_cache import V_MARGIN
    from megatron_longlive.inference.kernels import cudnn_fp8_attention as cfa
    from megatron_longlive.inference.kernels.cudnn_fp8_attention import cudnn_fp8_attention
    from megatron_longlive.inference.kernels.fp8_head_quant_triton import quantize_per_head
    from megatron_longlive.inference.window_attention import FP8Window, WindowKV

    h, d = q.shape[2], q.shape[3]
    qs, ks = ((x.abs().amax().float() * 1.02 / 448).reshape(()) for x in (q, k))
    vs = v.abs().amax(dim=(0, 1, 3)).float() * V_MARGIN / 448
    k8 = quantize_per_head(k[None], ks.reshape(1, 1).expand(1, h))[0]
    v8 = quantize_per_head(v[None], vs[None])[0]
    regions = torch.ones(k.shape[1] // tpc, dtype=torch.bool, device=q.device)
    win = WindowKV(k, v, regions, tpc, "cudnn-fp8", True, FP8Window(k8, v8, qs, ks, vs))
    q8 = quantize_per_head(q[None], qs.reshape(1, 1).expand(1, h))[0]
    def one_part(fn):
        def run():
            cfa.kv_splits_override = 1
            try:
                return fn()
            finally:
                cfa.kv_splits_override = None
        return run

    fns = {"cudnn-fp8": lambda: win.attend(q),
           "cudnn-fp8-kernel": lambda: cudnn_fp8_attention(q8, k8, v8, qs, ks, d ** -0.5)}
    fns.update({f"{label}-nosplit": one_part(fn) for label, fn in list(fns.items())})
    if q.is_cuda:
        print(f"  cudnn-fp8: auto_splits -> {cfa.auto_splits(*q.shape[:3], k.shape[1], cfa._sm_count(q.device))} "
              f"key part(s)")
    return {label: fn for label, fn in fns.items() if label in variants}


def run_setting(name, tpc, chunks, heads, d, layers, a, tag="", tiles=None) -> dict:
    """Time and check one setting; returns the best (BLOCK_M, BLOCK_N) of the old kernel per split_p (reused at
    other windows)."""
    from torch.nn.attention import SDPBackend

    from megatron_longlive.quant.nvfp4.kernels.kv_attention_triton import nvfp4_kv_attention

    dev = a.device
    skv = tpc * chunks
    flops = 4 * tpc * skv * heads * d
    cache = packed_window(tpc, chunks, heads, d, dev)
    kv = cache.packed(0)
    k, v = kv.dequantize(torch.bfloat16)                # the BF16 window the SDPA baselines read
    q = torch.randn(1, tpc, heads, d, device=dev, dtype=torch.bfloat16)
    rows = {}
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        if label in a.variants and dev == "cuda":
            rows[f"bf16 sdpa {label}"] = sdpa_ms(q, k, v, backend, a.warmup, a.iters)
    sdpa_out = None
    if a.check:                                          # the cuDNN output (math SDPA on CPU) the variants are held to
        from torch.nn.attention import sdpa_kernel

        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if dev == "cuda" else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            sdpa_out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    from megatron_longlive.inference.kernels import window_attention_triton as wat

    for label, fn in window_variants(q, k, v, kv, tpc, a.variants).items():
        try:
            out = fn()                                   # autotunes on CUDA (not timed)
            ms = cuda_time_ms(fn, a.warmup, a.iters)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  {label}: failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        rows[label] = ms
        tuned = getattr(wat._autotuned, "best_config", None) if label not in NO_ERROR and "cudnn" not in label \
            else None
        if tuned is not None:
            fn()                                         # the autotuner's best_config is the last call's
            print(f"  {label}: autotuned {wat._autotuned.best_config}")
        if sdpa_out is not None and label not in NO_ERROR:
            rel, mx = _errors(out, sdpa_out)
            print(f"  {label}: vs sdpa cudnn: relative error {rel:.2e}, max |diff| / max |ref| {mx:.2e}")
            record(a.out, f"{name}{tag} window attention {label}", "rel err vs sdpa cudnn", rel, "ratio", skv=skv,
                   max_rel=mx)
    ref = kv.reference_attention(q) if a.check and not tag else None     # fp32 oracle, main settings only
    del k, v
    best_tiles = {}
    for split in (True, False):
        if ("nvfp4-old-split" if split else "nvfp4-old") not in a.variants:
            continue
        best = None
        for bm, bn in (tiles or {}).get(split, a.tiles):
            fn = lambda: nvfp4_kv_attention(q, kv.k_codes, kv.k_scales, kv.k_ts, kv.v_codes, kv.v_scales, kv.v_ts,  # noqa: E731
                                            tpc, kv.valid, split_p=split, block_m=bm, block_n=bn)
            try:
                ms = cuda_time_ms(fn, a.warmup, a.iters)
            except Exception as e:                      # e.g. out of shared memory for a tile
                print(f"  nvfp4 tile {bm}x{bn}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            if best is None or ms < best[0]:
                best = (ms, bm, bn)
        label = f"nvfp4-kv triton{' split-p' if split else ''}"
        if best:
            best_tiles[split] = [best[1:]]
        rows[label] = best[0] if best else None
        if best and ref is not None:
            out = nvfp4_kv_attention(q, kv.k_codes, kv.k_scales, kv.k_ts, kv.v_codes, kv.v_scales, kv.v_ts, tpc,
                                     kv.valid, split_p=split, block_m=best[1], block_n=best[2])
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"  {label}: best tile {best[1]}x{best[2]}, relative error vs dequantized reference {err:.2e}")
            record(a.out, f"{name}{tag} nvfp4-kv attention", f"rel err vs reference{' split-p' if split else ''}",
                   err, "ratio", skv=skv)
    bf16_b, q4_b = cache_bytes(tpc, chunks, heads, d, layers)
    for label, ms in rows.items():
        if ms is None:
            continue
        if label == "fp8-quant":                     # memory-bound: bytes moved, not FLOPs
            moved = (tpc + 2 * skv) * heads * d * 3 + 2 * skv * heads * d * 2   # bf16 in, e4m3 out + K mean, V amax reads
            gbps = moved / (ms * 1e-3) / 1e9
            print(f"| {name}{tag} | {tpc} | {skv} | {heads} | {label} | {ms:.3f} | {gbps:.0f} GB/s | |")
            record(a.out, f"{name}{tag} self-attention {label}", "time", ms, "ms", sq=tpc, skv=skv, heads=heads,
                   head_dim=d, gbps=gbps)
            continue
        tflops = flops / ms / 1e9
        print(f"| {name}{tag} | {tpc} | {skv} | {heads} | {label} | {ms:.3f} | {tflops:.0f} | "
              f"{100 * tflops / a.peak_tflops:.0f}% |", flush=True)
        record(a.out, f"{name}{tag} self-attention {label}", "time", ms, "ms", sq=tpc, skv=skv, heads=heads,
               head_dim=d, tflops=tflops, flop_model="4*Sq*Skv*H*D")
    print(f"|   cache (K+V, {layers} layers, {chunks} chunks) | bf16 {bf16_b / 2**20:.1f} MiB | nvfp4 "
          f"{q4_b / 2**20:.1f} MiB | {bf16_b / q4_b:.2f}x |")
    record(a.out, f"{name}{tag} kv cache bf16", "memory", bf16_b / 2**20, "MiB", skv=skv, layers=layers)
    record(a.out, f"{name}{tag} kv cache nvfp4", "memory", q4_b / 2**20, "MiB", skv=skv, layers=layers,
           ratio=bf16_b / q4_b)
    return best_tiles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--no-growing", action="store_true", help="only the two streaming settings")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the error check vs reference")
    p.add_argument("--tiles", default="128x64,64x64,128x32", help="BLOCK_MxBLOCK_N candidates for the kernel")
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS), help="default: both")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="what to time (module docstring); default: all")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: TRITON_INTERPRET, tiny shapes")
    a = p.parse_args()
    a.tiles = [tuple(int(x) for x in t.split("x")) for t in a.tiles.split(",")]
    a.device = "cuda"
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"          # before the kernel module is imported
        SETTINGS.clear()
        SETTINGS["smoke"] = (48, 3, 2, 32, 2)
        GROWING[:] = [1, 2]
        a.device, a.warmup, a.iters, a.tiles = "cpu", 0, 1, [(32, 32)]
    else:
        for name in set(SETTINGS) - set(a.settings or SETTINGS):
            del SETTINGS[name]
    if not a.smoke and not torch.cuda.is_available():
        print("bench_kv_attention needs CUDA (or --smoke; the CPU path is tested in tests/unit/test_nvfp4_kv.py)")
        return 1
    print("| setting | Sq | Skv | heads | attention | ms | TFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    best = {name: run_setting(name, *setting, a) for name, setting in SETTINGS.items()}
    if not a.no_growing:
        for name, (tpc, _, heads, d, layers) in SETTINGS.items():
            for chunks in GROWING:
                run_setting(name, tpc, chunks, heads, d, layers, a, tag=f" window {chunks} chunks", tiles=best[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
