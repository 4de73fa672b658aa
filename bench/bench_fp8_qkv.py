"""Time a self-attention's q, k and v projections of one input, forward plus both backward GEMMs: BF16 against
the channel FP8 recipe as three separate linears, and as one linear of the concatenated weights
(quant/fp8_shared_input.py, what the trainer wires for Wan's q/k/v: x quantized once, one GEMM per pass).
For reference also BF16 as one [3 dim, dim] linear (what fusing alone buys BF16; the model runs three).

One training pass: x [tokens, dim] -> q, k, v (three dim->dim linears with bias), backward with three fixed
gradients (dx accumulates over the three, as in the model). Every variant CUDA-graphed (device time); per
variant the pass and its per-linear share, and the speedup over BF16. --profile prints each pass's top kernels.

  python bench/bench_fp8_qkv.py --out bench/results.jsonl       # CUDA sm89+ (H100/H200); --device cpu: smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_fp8_linear import cuda_time_ms, graphed_ms  # noqa: E402
from bench.profiling import print_kernels, top_kernels  # noqa: E402
from bench.record import record  # noqa: E402
from megatron_longlive.quant.fp8 import FP8Linear  # noqa: E402
from megatron_longlive.quant.fp8_shared_input import share_input_quantization  # noqa: E402

DIMS = {"1.3b": 1536, "5b": 3072}


class Projections(nn.Module):
    """q, k, v of one input, declared as such (WanSelfAttention's `same_input`)."""
    same_input = ("q", "k", "v")

    def __init__(self, q, k, v):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


class OneLinear(nn.Module):
    """q, k, v as one BF16 linear [3 dim, dim] (the reference row: not what the model runs)."""

    def __init__(self, lins):
        super().__init__()
        self.qkv = nn.Linear(lins[0].in_features, 3 * lins[0].out_features, device=lins[0].weight.device,
                             dtype=lins[0].weight.dtype)

    def forward(self, x):
        return self.qkv(x).chunk(3, dim=-1)


def variants(dim: int, device, emulate: bool) -> dict[str, nn.Module]:
    lins = [nn.Linear(dim, dim, device=device, dtype=torch.bfloat16) for _ in range(3)]
    fp8 = lambda: [FP8Linear.from_linear(m, emulate=emulate, fast_accum=True, recipe="channel_delayed",  # noqa: E731
                                         fast_accum_backward=True) for m in lins]
    fused = Projections(*fp8())
    assert share_input_quantization(fused) == 1
    return {"bf16": Projections(*lins), "bf16 one linear": OneLinear(lins), "fp8 channel separate": Projections(*fp8()),
            "fp8 channel one GEMM": fused}


def bench_dim(model: str, dim: int, tokens: int, a) -> dict[str, float]:
    dev = torch.device(a.device)
    mods = variants(dim, dev, emulate=a.device == "cpu")
    x = torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dys = [torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    def step(mod):
        params = list(mod.parameters())

        def run():
            x.grad = None
            for p in params:
                p.grad = None
            torch.autograd.backward(mod(x), dys)
        return run

    times = {}
    for label, mod in mods.items():
        run = step(mod)
        run()                                   # bootstraps the amax histories
        times[label] = graphed_ms(run, a.warmup, a.iters) if dev.type == "cuda" else cuda_time_ms(run, 1, a.iters)
        if a.profile and dev.type == "cuda":
            print_kernels(f"{model} q/k/v {tokens}x{dim} {label}", top_kernels(run, dev, 12))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65520, help="rows of x (65520: the 1.3B teacher-forcing sequence)")
    p.add_argument("--models", nargs="+", default=sorted(DIMS), choices=sorted(DIMS))
    p.add_argument("--dim", type=int, default=None, help="override the models: one projection width")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke run of this script (emulated FP8)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="print each pass's top device kernels")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    a = p.parse_args(argv)
    if a.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        print("bench_fp8_qkv: needs a CUDA GPU with FP8 tensor cores (sm89+, e.g. H100)", file=sys.stderr)
        return 2
    dims = {"custom": a.dim} if a.dim else {m: DIMS[m] for m in a.models}
    timing = "CUDA-graphed" if a.device == "cuda" else "wall clock, emulated"
    print(f"q, k, v of one x, one training pass ({timing}); per linear = pass / 3")
    print(f"{'model':6} {'tokens x dim':>14} {'variant':>22} {'pass ms':>9} {'per linear':>11} {'vs bf16':>8}")
    for model, dim in dims.items():
        t = bench_dim(model, dim, a.tokens, a)
        name = f"attention q/k/v {model} {a.tokens}x{dim}->3x{dim} fwd+dgrad+wgrad"
        for label, ms in t.items():
            speedup = t["bf16"] / ms
            print(f"{model:6} {f'{a.tokens}x{dim}':>14} {label:>22} {ms:9.3f} {ms / 3:11.3f} {speedup:7.2f}x")
            record(a.out, f"{name} {label} graphed", "time", round(ms, 4), "ms")
            if label != "bf16":
                setting = " (fast accumulation everywhere)" if label.startswith("fp8") else ""
                record(a.out, f"{name} {label}{setting}", "speedup over bf16 (three linears), both graphed",
                       round(speedup, 3), "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
