"""Time a BF16 linear against the FP8 linear (E4M3 rowwise scaled-mm), forward + both backward GEMMs.

Shapes: tokens x (in -> out) of the Wan2.1-1.3B (dim 1536, ffn 8960) and Wan2.2-5B (dim 3072, ffn 14336)
layers. Each row times one training pass of the layer (y = xW^T + b, then dx and dW), quantization of all
six operands included for FP8 (x, W, dy each quantized once into both layouts by fp8_triton);
`fp8 gemm-only` times the three E4M3 GEMMs on pre-quantized operands (the ceiling), `fp8 quantize x+dy`
the fused quantization of the two big operands. Prints a table, appends JSON lines (bench/record.py) to --out.

  python bench/bench_fp8_linear.py --out bench/results.jsonl           # needs CUDA sm89+ (H100/H200)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from megatron_longlive.quant.fp8 import FP8Linear, quantize_both, quantize_rowwise  # noqa: E402

SHAPES = {"1.3b": [(1536, 1536), (1536, 8960), (8960, 1536)],
          "5b": [(3072, 3072), (3072, 14336), (14336, 3072)]}


def cuda_time_ms(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call (CUDA events; wall clock when CUDA is absent, for smoke runs)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_shape(tokens: int, k: int, n: int, a) -> dict[str, float]:
    dev = torch.device(a.device)
    lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin, emulate=False)
    x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)

    def step(mod):
        def run():
            x.grad = None
            lin.weight.grad = None
            lin.bias.grad = None
            mod(x).backward(dy)
        return run

    # the three GEMMs alone on operands quantized once (no quantization in the timed loop)
    mpad = (tokens + 15) // 16 * 16
    qx, sx = quantize_rowwise(x.detach())
    qw, sw = quantize_rowwise(lin.weight.detach())
    qdy, sdy = quantize_rowwise(dy)
    qwt, swt = quantize_rowwise(lin.weight.detach().t().contiguous())
    qdyt, sdyt = quantize_rowwise(torch.nn.functional.pad(dy.t(), (0, mpad - tokens)).contiguous())
    qxt, sxt = quantize_rowwise(torch.nn.functional.pad(x.detach().t(), (0, mpad - tokens)).contiguous())

    def gemms():
        torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16)
        torch._scaled_mm(qdy, qwt.t(), scale_a=sdy, scale_b=swt.t(), out_dtype=torch.bfloat16)
        torch._scaled_mm(qdyt, qxt.t(), scale_a=sdyt, scale_b=sxt.t(), out_dtype=torch.bfloat16)

    times = {"bf16": cuda_time_ms(step(lin), a.warmup, a.iters),
             "fp8": cuda_time_ms(step(fp8), a.warmup, a.iters),
             "fp8 gemm-only": cuda_time_ms(gemms, a.warmup, a.iters),
             "fp8 quantize x+dy": cuda_time_ms(lambda: (quantize_both(x.detach()), quantize_both(dy)),
                                               a.warmup, a.iters)}
    del x, dy, lin, fp8
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32760, help="rows of x (1.3B: 21 latent frames x 1560)")
    p.add_argument("--models", nargs="+", default=["1.3b", "5b"], choices=sorted(SHAPES))
    p.add_argument("--shapes", nargs="+", default=None, help="override: IN:OUT pairs, e.g. 64:128")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke run of this script")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    a = p.parse_args(argv)
    shapes = {m: SHAPES[m] for m in a.models}
    if a.shapes:
        shapes = {"custom": [tuple(int(v) for v in s.split(":")) for s in a.shapes]}
    if a.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        print("bench_fp8_linear: needs a CUDA GPU with FP8 tensor cores (sm89+, e.g. H100)", file=sys.stderr)
        return 2
    print(f"{'model':6} {'in->out':>13} {'bf16 ms':>9} {'fp8 ms':>9} {'gemm ms':>9} {'quant ms':>9} {'speedup':>8} "
          f"{'bf16 TF/s':>10} {'fp8 TF/s':>9} {'gemm TF/s':>10}")
    for model, pairs in shapes.items():
        for k, n in pairs:
            t = bench_shape(a.tokens, k, n, a)
            flops = 3 * 2 * a.tokens * k * n
            tf = {key: flops / (v * 1e-3) / 1e12 for key, v in t.items() if "quantize" not in key}
            speedup = t["bf16"] / t["fp8"]
            print(f"{model:6} {f'{k}->{n}':>13} {t['bf16']:9.3f} {t['fp8']:9.3f} {t['fp8 gemm-only']:9.3f} "
                  f"{t['fp8 quantize x+dy']:9.3f} "
                  f"{speedup:8.2f} {tf['bf16']:10.0f} {tf['fp8']:9.0f} {tf['fp8 gemm-only']:10.0f}")
            name = f"linear {model} {a.tokens}x{k}->{n} fwd+dgrad+wgrad"
            for key in t:
                record(a.out, f"{name} {key}", "time", round(t[key], 4), "ms")
                if key in tf:
                    record(a.out, f"{name} {key}", "throughput", round(tf[key], 1), "TFLOP/s")
            record(a.out, name, "fp8 speedup over bf16", round(speedup, 3), "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
