"""Bandwidth of the Triton NVFP4 quantize/dequantize kernels as a fraction of a plain device copy.

Bytes are counted per kernel as what it must move: for n BF16 values, a quantize pass reads 2n bytes and
writes n/2 code bytes + n/16 scale bytes (n/256 for 16x16 tiles); the amax pass reads 2n more. A copy of
the same tensor moves 4n bytes. Per variant:
  GB/s        moved bytes / time;  `frac` = GB/s / copy GB/s (target >= 0.8 for the single-pass kernels)
  eff frac    bytes of ONE read + the writes / time / copy GB/s: the end-to-end cost of a two-pass op (its
              ceiling is (2.56n) / (4.56n) = 0.56 at copy speed); equals `frac` for single-pass rows.
"amax given" rows are the quantize pass alone (a fused producer or the KV cache's per-chunk amax supply
it); "two-pass" rows are the whole op (amax pass + quantize pass). Times are CUDA-graph replays (no host
launch overhead); `eager` is the plain Python call (custom op + launches) for comparison.
Prints a table, appends JSON lines (bench/record.py) to --out.

  python bench/bench_nvfp4.py --out bench/results.jsonl          # needs CUDA
  python bench/bench_nvfp4.py --sweep                            # + launch-shape sweep of the 1x16 kernel
  python bench/bench_nvfp4.py --recipe-ablation --device cpu --out bench/results.jsonl   # RHT/SR/2D effect
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_fp8_linear import cuda_time_ms  # noqa: E402
from bench.record import record  # noqa: E402

SHAPES = [(32760, 1536), (32760, 3072), (32760, 8960), (32760, 14336)]   # tokens x dim: 1.3B / 5B layers

ABLATION = {"all on": {}, "rht off": dict(rht=False), "sr off": dict(stochastic_rounding=False),
            "2d off": dict(weight_2d=False), "all off": dict(rht=False, stochastic_rounding=False, weight_2d=False)}


def tiny_training_losses(quant, steps: int, seed: int = 0, device: str = "cpu") -> list[float]:
    """AdamW steps of the tiny WanDiT on one fixed random batch (velocity-shaped MSE); the losses."""
    from megatron_longlive.config import preset_config
    from megatron_longlive.models.wan import WanDiT
    from megatron_longlive.quant.fp8_ffn import fuse_for_training
    from megatron_longlive.quant.providers import build_linear_provider

    torch.manual_seed(seed)
    model = WanDiT(preset_config("tiny"), build_linear_provider(quant))
    fuse_for_training(model, quant)                    # as the trainer builds it (fused FP8 FFN where it applies)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model.to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x, t = torch.randn(1, 16, 2, 8, 8, generator=g), torch.rand(1, generator=g) * 1000
    ctx, target = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 2, 8, 8, generator=g)
    x, t, ctx, target = (v.to(device) for v in (x, t, ctx, target))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = (model(x, t, ctx) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def recipe_ablation(a) -> None:
    """Max relative loss gap to the unquantized run, per NVFP4 switch setting, on the tiny model."""
    from megatron_longlive.config import QuantConfig

    device = a.device if a.device == "cpu" or torch.cuda.is_available() else "cpu"
    base = tiny_training_losses(QuantConfig(linear="bf16"), a.steps, device=device)
    print(f"tiny WanDiT, {a.steps} AdamW steps: unquantized loss {base[0]:.4f} -> {base[-1]:.4f}")
    print(f"{'recipe':>10} {'max rel gap':>12} {'final loss':>11}")
    for label, switches in ABLATION.items():
        q = tiny_training_losses(QuantConfig(linear="nvfp4_emulated", **switches), a.steps, device=device)
        gap = max(abs(u - v) / v for u, v in zip(q, base))
        print(f"{label:>10} {gap:12.4f} {q[-1]:11.4f}")
        record(a.out, f"nvfp4 tiny-wan recipe {label} {a.steps} steps", "max relative loss gap to unquantized",
               round(gap, 5), "ratio", final_loss=round(q[-1], 5), unquantized_final=round(base[-1], 5))


def graph_time_ms(fn, iters: int) -> tuple[float, str]:
    """Mean ms per call of `fn` replayed from a CUDA graph of `iters` calls (eager timing if capture fails)."""
    fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
    except Exception as e:  # noqa: BLE001 - report and fall back, the number is still useful
        print(f"  (graph capture failed: {type(e).__name__}; eager timing)", file=sys.stderr)
        return cuda_time_ms(fn, 3, iters), "eager"
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (3 * iters), "graph"


def variants(x: torch.Tensor, signs: torch.Tensor) -> dict:
    """label -> (fn, moved bytes, bytes of one read + the writes)."""
    from megatron_longlive.quant.nvfp4.kernels import ops

    m, k = x.shape
    n = x.numel()
    amax = ops.tensor_amax(x)
    amax_rht = ops.tensor_amax(x, signs)
    q = ops.quantize(x, check_finite=False)
    w1, w2 = n // 2 + n // 16, n // 2 + n // 256           # code + scale bytes written (1x16, 16x16)
    one, two = 2 * n, 4 * n                                # bytes read by one / two passes over x
    x2 = x[:m // 16 * 16]                                  # 16x16 tiles need M % 16 == 0
    r2 = x2.shape[0] / m
    return {
        "amax pass": (lambda: ops.tensor_amax(x), one, one),
        "1x16 amax given": (lambda: ops.quantize(x, check_finite=False, amax=amax), one + w1, one + w1),
        "1x16 two-pass": (lambda: ops.quantize(x, check_finite=False), two + w1, one + w1),
        "rht amax given": (lambda: ops.quantize(x, rht_signs=signs, check_finite=False, amax=amax_rht),
                           one + w1, one + w1),
        "rht two-pass": (lambda: ops.quantize(x, rht_signs=signs, check_finite=False), two + w1, one + w1),
        "rht+sr amax given": (lambda: ops.quantize(x, rht_signs=signs, stochastic=True, seed=1, check_finite=False,
                                                   amax=amax_rht), one + w1, one + w1),
        "16x16 amax given": (lambda: ops.quantize(x2, block_2d=True, check_finite=False, amax=amax),
                             r2 * (one + w2), r2 * (one + w2)),
        "16x16 two-pass": (lambda: ops.quantize(x2, block_2d=True, check_finite=False), r2 * (two + w2),
                           r2 * (one + w2)),
        "dequantize bf16": (lambda: ops.dequantize(*q, dtype=torch.bfloat16), w1 + one, w1 + one),
    }


SWEEP = [dict(NB=64, num_warps=2), dict(NB=128, num_warps=4), dict(NB=256, num_warps=4), dict(NB=256, num_warps=8),
         dict(NB=512, num_warps=4), dict(NB=512, num_warps=8)]


def sweep(x: torch.Tensor, copy_gbs: float, iters: int) -> None:
    """Fraction of copy of the single-pass 1x16 kernel for each launch shape in SWEEP (ops.CONFIG['1x16'])."""
    from megatron_longlive.quant.nvfp4.kernels import ops

    n = x.numel()
    amax = ops.tensor_amax(x)
    default = dict(ops.CONFIG["1x16"])
    print(f"sweep 1x16 amax given, {tuple(x.shape)} (default {default}):")
    try:
        for cfg in SWEEP:
            ops.CONFIG["1x16"] = cfg
            t, _ = graph_time_ms(lambda: ops.quantize(x, check_finite=False, amax=amax), iters)
            print(f"  NB={cfg['NB']:4d} warps={cfg['num_warps']}: {t:.4f} ms, "
                  f"frac {(2 * n + n // 2 + n // 16) / (t * 1e-3) / 1e9 / copy_gbs:.2f}")
    finally:
        ops.CONFIG["1x16"] = default


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--shapes", nargs="+", default=None, help="override: MxK, e.g. 64x128")
    p.add_argument("--only", nargs="+", default=None, help="variant labels to run (default: all)")
    p.add_argument("--sweep", action="store_true", help="also sweep the 1x16 launch shape on the 3rd shape")
    p.add_argument("--device", default="cuda", help="cpu only for --recipe-ablation")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    p.add_argument("--recipe-ablation", action="store_true",
                   help="instead: train the tiny WanDiT with each RHT/SR/2D setting (CPU is fine)")
    p.add_argument("--steps", type=int, default=12, help="training steps of --recipe-ablation")
    a = p.parse_args(argv)
    if a.recipe_ablation:
        recipe_ablation(a)
        return 0
    if not torch.cuda.is_available():
        print("bench_nvfp4: needs a CUDA GPU (the Triton kernels are benchmarked compiled)", file=sys.stderr)
        return 2
    from megatron_longlive.quant.nvfp4.hadamard import rht_signs

    signs = rht_signs(0, "cuda")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    print(f"{torch.cuda.get_device_name()}; times: CUDA graph of {a.iters} calls")
    print(f"{'shape':>12} {'variant':>18} {'ms':>7} {'eager':>7} {'GB/s':>6} {'frac':>5} {'eff frac':>8}")
    for si, (m, k) in enumerate(shapes):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        n = x.numel()
        t_copy, _ = graph_time_ms(lambda: y.copy_(x), a.iters)
        copy_gbs = 4 * n / (t_copy * 1e-3) / 1e9
        print(f"{f'{m}x{k}':>12} {'copy':>18} {t_copy:7.3f} {'':>7} {copy_gbs:6.0f} {1.0:5.2f} {1.0:8.2f}")
        record(a.out, f"nvfp4 bench copy bf16 {m}x{k}", "bandwidth", round(copy_gbs, 1), "GB/s")
        for label, (fn, moved, useful) in variants(x, signs).items():
            if a.only and label not in a.only:
                continue
            t, how = graph_time_ms(fn, a.iters)
            t_eager = cuda_time_ms(fn, 2, a.iters)
            gbs = moved / (t * 1e-3) / 1e9
            frac, eff = gbs / copy_gbs, useful / (t * 1e-3) / 1e9 / copy_gbs
            print(f"{'':>12} {label:>18} {t:7.3f} {t_eager:7.3f} {gbs:6.0f} {frac:5.2f} {eff:8.2f}"
                  + ("" if how == "graph" else " (eager)"))
            name = f"nvfp4 {label} bf16 {m}x{k}"
            record(a.out, name, "time", round(t, 4), "ms", eager_ms=round(t_eager, 4))
            record(a.out, name, "bandwidth fraction of copy", round(frac, 3), "x", copy_gbs=round(copy_gbs, 1),
                   moved_bytes=moved, effective_fraction=round(eff, 3))
        if a.sweep and si == min(2, len(shapes) - 1):
            sweep(x, copy_gbs, a.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
