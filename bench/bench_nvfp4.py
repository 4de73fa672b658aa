"""Bandwidth of the Triton NVFP4 quantize/dequantize kernels as a fraction of a plain device copy.

For a BF16 tensor of n values, quantize reads 2n bytes (twice: the amax pass and the quantize pass) and
writes n/2 code bytes + n/16 scale bytes; `useful GB/s` counts one read plus the writes, over the time of
both passes; a copy moves 4n bytes. `fraction` = useful GB/s / copy GB/s (target >= 0.8). The
`amax given` row is the single-pass kernel (amax supplied by the caller, e.g. fused upstream).
Prints a table, appends JSON lines (bench/record.py) to --out.

  python bench/bench_nvfp4.py --out bench/results.jsonl          # needs CUDA
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

SHAPES = [(32760, 1536), (32760, 8960), (8960, 1536), (14336, 3072)]

ABLATION = {"all on": {}, "rht off": dict(rht=False), "sr off": dict(stochastic_rounding=False),
            "2d off": dict(weight_2d=False), "all off": dict(rht=False, stochastic_rounding=False, weight_2d=False)}


def tiny_training_losses(quant, steps: int, seed: int = 0, device: str = "cpu") -> list[float]:
    """AdamW steps of the tiny WanDiT on one fixed random batch (velocity-shaped MSE); the losses."""
    from megatron_longlive.config import preset_config
    from megatron_longlive.models.wan import WanDiT
    from megatron_longlive.quant.providers import build_linear_provider

    torch.manual_seed(seed)
    model = WanDiT(preset_config("tiny"), build_linear_provider(quant))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--shapes", nargs="+", default=None, help="override: MxK, e.g. 64x128")
    p.add_argument("--device", default="cuda", help="cpu (with TRITON_INTERPRET=1) only for a smoke run")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    p.add_argument("--recipe-ablation", action="store_true",
                   help="instead: train the tiny WanDiT with each RHT/SR/2D setting (CPU is fine)")
    p.add_argument("--steps", type=int, default=12, help="training steps of --recipe-ablation")
    a = p.parse_args(argv)
    if a.recipe_ablation:
        recipe_ablation(a)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_nvfp4: needs a CUDA GPU (the Triton kernels are benchmarked compiled)", file=sys.stderr)
        return 2
    from megatron_longlive.quant.nvfp4.hadamard import rht_signs
    from megatron_longlive.quant.nvfp4.kernels import ops

    signs = rht_signs(0, a.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    print(f"{'shape':>14} {'kernel':>20} {'ms':>8} {'useful GB/s':>12} {'copy GB/s':>10} {'fraction':>9}")
    for m, k in shapes:
        x = torch.randn(m, k, device=a.device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        n = x.numel()
        t_copy = cuda_time_ms(lambda: y.copy_(x), a.warmup, a.iters)
        copy_gbs = 4 * n / (t_copy * 1e-3) / 1e9
        q = ops.quantize(x)
        amax = x.abs().amax().float()
        cases = {
            "quantize 1x16": (lambda: ops.quantize(x, check_finite=False), 2 * n + n // 2 + n // 16),
            "quantize amax given": (lambda: ops.quantize(x, check_finite=False, amax=amax), 2 * n + n // 2 + n // 16),
            "quantize 1x16 rht": (lambda: ops.quantize(x, rht_signs=signs, check_finite=False),
                                  2 * n + n // 2 + n // 16),
            "quantize rht+sr": (lambda: ops.quantize(x, rht_signs=signs, stochastic=True, seed=1,
                                                     check_finite=False), 2 * n + n // 2 + n // 16),
            "quantize 16x16": (lambda: ops.quantize(x[:m // 16 * 16], block_2d=True, check_finite=False),
                               2 * n + n // 2 + n // 256),
            "dequantize bf16": (lambda: ops.dequantize(*q, dtype=torch.bfloat16), n // 2 + n // 16 + 2 * n),
        }
        for label, (fn, useful_bytes) in cases.items():
            t = cuda_time_ms(fn, a.warmup, a.iters)
            gbs = useful_bytes / (t * 1e-3) / 1e9
            frac = gbs / copy_gbs
            print(f"{f'{m}x{k}':>14} {label:>20} {t:8.3f} {gbs:12.0f} {copy_gbs:10.0f} {frac:9.2f}")
            name = f"nvfp4 {label} bf16 {m}x{k}"
            record(a.out, name, "time", round(t, 4), "ms")
            record(a.out, name, "bandwidth fraction of copy", round(frac, 3), "x", copy_gbs=round(copy_gbs, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
