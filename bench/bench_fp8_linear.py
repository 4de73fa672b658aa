"""Time a BF16 linear against the FP8 training linear (E4M3 rowwise scaled-mm), forward + both backward GEMMs.

Shapes: tokens x (in -> out) of the Wan2.1-1.3B (dim 1536, ffn 8960) and Wan2.2-5B (dim 3072, ffn 14336)
layers. Per shape, one training pass of the layer (y = xW^T + b, then dx, dW, db):
  bf16 ms      nn.Linear in bf16 (cuBLAS, bias in the epilogue, db a separate reduction)
  fp8 ms       FP8Linear as the trainer runs it: x, W, dy each quantized once into both layouts by
               fp8_triton (db fused into dy's first pass), bias in the scaled-mm epilogue
  gemm ms      the three E4M3 GEMMs alone on pre-quantized operands (the ceiling), `fast` with use_fast_accum
  quant ms     the fused quantization alone (x, W, dy + db)
  floor ms     quant's byte floor: 6 bytes per value of x, W, dy (2 reads of bf16, 2 one-byte writes) at the
               measured device-copy bandwidth; `best` = bf16 / (gemm + floor), the speedup this recipe can reach
  blk ms       exploration: the three GEMMs with 1x128 block scales on both operands (cuBLAS >= 12.9 on sm90;
               nan where this torch/CUDA lacks it). Such scales come from one read of a 128x128 tile, so that
               recipe's floor is 4 bytes per value: `blk best` = bf16 / (blk + 4/6 floor)
  ch ms        FP8Linear with quant.fp8_recipe=channel_delayed (fp8_channel.py: delayed per-channel scales, one
               pointwise E4M3 copy of x and of dy, 4 bytes per value), fast-accum fprop, after warm-up (so the
               amax histories are running); `ch quant` its quantization alone (x, dy + db, the weight fold)
Per token count (--tokens; 65520 is the teacher-forcing sequence of 21 latent frames) three more tables:
  details      per GEMM, the fast accumulator's relative error against promoted accumulation, and both against the
               exact product of the BF16 operands (the error E4M3 operands cost already); each GEMM alone in
               BF16 and FP8 (and, exploration, the wgrad as two token halves, and the dgrad and wgrad on one
               stream vs two: does the wgrad's last wave, 144 tiles of 1536x1536 on 132 SMs, hide behind the
               dgrad); SM clock and power under load
  graphed      one training pass captured in a CUDA graph and replayed (device time, no host launch cost): BF16,
               rowwise (fast fprop), channel, channel with quant.fp8_fast_accum_backward
  FFN          per model, the FFN pair with its GELU: BF16, rowwise FP8 linears, and the channel recipe's fused FFN
               (quant/fp8_ffn.py: GELU and GELU backward inside the quantizers), eager and graphed; graphed also
               with quant.fp8_fast_accum_backward (fast-all)
--profile adds, per shape and FFN, the top device kernels of one pass: BF16 against the channel recipe (where the
FP8 pass spends its time beyond the GEMMs).
Prints the tables, appends JSON lines (bench/record.py) to --out.

  python bench/bench_fp8_linear.py --out bench/results.jsonl           # needs CUDA sm89+ (H100/H200)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profiling import print_kernels, top_kernels  # noqa: E402
from bench.record import record  # noqa: E402
from megatron_longlive.quant.fp8 import TOKEN_PAD, FP8Linear, quantize_both  # noqa: E402

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


def graphed_ms(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of fn replayed from a CUDA graph: the device time of the pass with no host
    launch cost, what the layer costs inside a training step whose host runs ahead of the GPU (attention and
    the other layers keep the queue full). NaN without CUDA or where capture fails (reason printed)."""
    if not torch.cuda.is_available():
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):          # warm-up (autotuning, caches) off the capture
            for _ in range(max(warmup, 3)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:                # pragma: no cover - depends on the GPU stack
        print(f"graph capture failed: {str(err).splitlines()[0]}", file=sys.stderr)
        return float("nan")
    return cuda_time_ms(graph.replay, warmup, iters)


def copy_bandwidth(a) -> float:
    """Bytes per second of a plain device copy (read + write) of 1 GiB: the bandwidth a quantizer can reach."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=a.device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), a.warmup, a.iters)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench_shape(tokens: int, k: int, n: int, a, bandwidth: float) -> dict[str, float]:
    dev = torch.device(a.device)
    lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin, emulate=False)
    fp8_fast = FP8Linear.from_linear(lin, emulate=False, fast_accum=True)    # quant.fp8_fast_accum
    fp8_channel = FP8Linear.from_linear(lin, emulate=False, fast_accum=True, recipe="channel_delayed")
    fp8_channel_fast = FP8Linear.from_linear(lin, emulate=False, fast_accum=True, recipe="channel_delayed",
                                             fast_accum_backward=True)      # quant.fp8_fast_accum_backward
    x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
    w = lin.weight.detach()

    def step(mod):
        def run():
            x.grad = None
            lin.weight.grad = None
            lin.bias.grad = None
            mod(x).backward(dy)
        return run

    # the three GEMMs alone on operands quantized once (no quantization in the timed loop)
    qx, sx, qxt, sxt = quantize_both(x.detach(), pad=TOKEN_PAD)     # as the linear lays out activations
    qw, sw, qwt, swt = quantize_both(w)
    qdy, sdy, qdyt, sdyt = quantize_both(dy, pad=TOKEN_PAD)
    operands = {"fprop": (qx, sx, qw, sw), "dgrad": (qdy, sdy, qwt, swt), "wgrad": (qdyt, sdyt, qxt, sxt)}

    def gemms(fast: bool):
        def run():
            for g in operands:
                scaled_mm(*operands[g], fast=fast, bias=lin.bias if g == "fprop" else None)
        return run

    def ones(q):                                        # [rows, k/128] scales, outer-dim-major as cuBLAS wants
        return torch.ones(q.shape[1] // 128, q.shape[0], device=dev).t()

    block_operands = [(qa, ones(qa), qb, ones(qb)) for qa, _, qb, _ in operands.values()]

    def blockwise_gemms():
        for ops in block_operands:
            scaled_mm(*ops)

    try:
        blockwise_gemms()
        blk = cuda_time_ms(blockwise_gemms, a.warmup, a.iters)
    except (RuntimeError, NotImplementedError, ValueError):
        blk = float("nan")

    def quantize():
        quantize_both(x.detach(), pad=TOKEN_PAD)
        quantize_both(w)
        quantize_both(dy, col_sum=True, pad=TOKEN_PAD)

    from megatron_longlive.quant.fp8_channel import DelayedChannelScale, quantize_channelwise

    xs, dys = DelayedChannelScale(), DelayedChannelScale()
    xs.bootstrap(x.detach())
    dys.bootstrap(dy)

    def channel_quantize():
        quantize_channelwise(x.detach(), xs.scales()[1], xs.pending)
        quantize_channelwise(dy, dys.scales()[1], dys.pending, col_sum=True)
        quantize_both(w, fold=(xs.scales()[0], dys.scales()[0]))

    times = {"bf16 graphed": graphed_ms(step(lin), a.warmup, a.iters),
             "fp8 fast-accum fprop graphed": graphed_ms(step(fp8_fast), a.warmup, a.iters),
             "fp8 channel_delayed graphed": graphed_ms(step(fp8_channel), a.warmup, a.iters),
             "fp8 channel_delayed fast-accum all graphed": graphed_ms(step(fp8_channel_fast), a.warmup, a.iters),
             "bf16": cuda_time_ms(step(lin), a.warmup, a.iters),
             "fp8 channel_delayed": cuda_time_ms(step(fp8_channel), a.warmup, a.iters),
             "fp8 channel_delayed quantize x+w+dy": cuda_time_ms(channel_quantize, a.warmup, a.iters),
             "fp8": cuda_time_ms(step(fp8), a.warmup, a.iters),
             "fp8 fast-accum fprop": cuda_time_ms(step(fp8_fast), a.warmup, a.iters),
             "fp8 gemm-only": cuda_time_ms(gemms(False), a.warmup, a.iters),
             "fp8 gemm-only fast-accum": cuda_time_ms(gemms(True), a.warmup, a.iters),
             "fp8 quantize x+w+dy": cuda_time_ms(quantize, a.warmup, a.iters),
             "fp8 quantize floor": 6 * (tokens * k + tokens * n + n * k) / bandwidth * 1e3,
             "fp8 gemm-only blockwise 1x128": blk}
    xb, wb = x.detach(), w
    bf16_gemms = {"fprop": lambda: xb @ wb.t(), "dgrad": lambda: dy @ wb, "wgrad": lambda: dy.t() @ xb}
    for g, b16 in bf16_gemms.items():           # which GEMM loses FP8's edge at which token count
        times[f"fp8 {g} gemm"] = cuda_time_ms(lambda: scaled_mm(*operands[g]), a.warmup, a.iters)
        times[f"bf16 {g} gemm"] = cuda_time_ms(b16, a.warmup, a.iters)
    half = qdyt.shape[1] // 32 * 16                 # exploration: the wgrad as two token halves (fp32 partials)

    def wgrad_split():
        lo, hi_ = (scaled_mm(qdyt[:, part], sdyt, qxt[:, part], sxt, out_dtype=torch.float32)
                   for part in (slice(None, half), slice(half, None)))
        return (lo + hi_).to(torch.bfloat16)

    side = torch.cuda.Stream() if dev.type == "cuda" else None

    def grads(concurrent: bool):                 # exploration: the wgrad on a second stream beside the dgrad
        def run():
            if not concurrent:
                scaled_mm(*operands["dgrad"])
                scaled_mm(*operands["wgrad"])
                return
            main_stream = torch.cuda.current_stream()
            side.wait_stream(main_stream)
            scaled_mm(*operands["dgrad"])
            with torch.cuda.stream(side):
                scaled_mm(*operands["wgrad"])
            main_stream.wait_stream(side)
        return run

    if side is not None:
        times["fp8 dgrad+wgrad sequential"] = cuda_time_ms(grads(False), a.warmup, a.iters)
        times["fp8 dgrad+wgrad concurrent"] = cuda_time_ms(grads(True), a.warmup, a.iters)
    try:
        times["fp8 wgrad gemm split in 2"] = cuda_time_ms(wgrad_split, a.warmup, a.iters)
    except (RuntimeError, ValueError) as err:      # strided halves refused by this torch/cuBLAS
        print(f"wgrad split: {str(err).splitlines()[0]}", file=sys.stderr)
        times["fp8 wgrad gemm split in 2"] = float("nan")
    if a.profile:
        for label, mod in (("bf16", lin), ("channel", fp8_channel), ("channel fast-all", fp8_channel_fast)):
            print_kernels(f"{tokens}x{k}->{n} {label}", top_kernels(step(mod), dev, 10))
    exact = {"fprop": lambda: xb.float() @ wb.float().t(), "dgrad": lambda: dy.float() @ wb.float(),
             "wgrad": lambda: dy.float().t() @ xb.float()}
    times.update(fast_accum_errors(operands, exact))
    times.update(clocks_under_load(step(lin), "bf16"))
    times.update(clocks_under_load(gemms(True), "fp8 gemm-only fast-accum"))
    return times


def scaled_mm(qa, sa, qb, sb, fast: bool = False, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """(qa * sa) [M, K] @ ((qb * sb) [N, K])^T for row-major E4M3 operands with rowwise scales."""
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast)


def fast_accum_errors(operands: dict, exact: dict | None = None) -> dict[str, float]:
    """Per GEMM (fprop, dgrad, wgrad: name -> operands), the relative Frobenius error of the tensor cores' fast
    accumulation against the promoted (fp32) one on the same E4M3 operands: what quant.fp8_fast_accum_backward
    costs (the wgrad reduces over all tokens). With `exact` (name -> fp32 product of the BF16 operands, callable),
    also the error of the promoted and of the fast FP8 GEMM against it: the budget E4M3 operands spend already,
    which fast accumulation adds to (errors of independent sources add in quadrature)."""
    out = {}
    for name, ops in operands.items():
        promoted, fast = (scaled_mm(*ops, fast=f, out_dtype=torch.float32) for f in (False, True))
        out[f"fp8 {name} fast-accum relative error"] = ((fast - promoted).norm() / promoted.norm()).item()
        # a systematic part (e.g. truncation shrinking every sum) shows as a least-squares scale away from 1
        out[f"fp8 {name} fast-accum scale vs promoted"] = ((fast * promoted).sum() / promoted.square().sum()).item()
        if exact is not None:
            ref = exact[name]()
            for label, got in (("promoted", promoted), ("fast-accum", fast)):
                err = (got - ref).norm() / ref.norm()
                out[f"fp8 {name} {label} vs bf16 operands exact relative error"] = err.item()
            del ref
    return out


def clocks_under_load(fn, label: str, seconds: float = 0.3) -> dict[str, float]:
    """SM clock (MHz) and board power (W) sampled by nvidia-smi while ~`seconds` of fn run back to back: FP8
    GEMMs may drive an H100 into its power cap, which lowers the clock and the FP8:BF16 ratio on long runs."""
    import subprocess
    import time

    if not torch.cuda.is_available():
        return {}
    per_call = max(cuda_time_ms(fn, 1, 3), 1e-3) * 1e-3
    for _ in range(max(1, int(seconds / per_call))):
        fn()
    time.sleep(seconds / 2)                          # the queue is still draining: sample mid-run
    try:
        line = subprocess.run(["nvidia-smi", f"--id={torch.cuda.current_device()}",
                               "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        clock, power = (float(v) for v in line.split(","))
    except (OSError, ValueError, subprocess.SubprocessError):
        clock = power = float("nan")
    torch.cuda.synchronize()
    return {f"{label} sm clock under load": clock, f"{label} power under load": power}


FFNS = {"1.3b": (1536, 8960), "5b": (3072, 14336)}


def bench_ffn(tokens: int, dim: int, hidden: int, a) -> dict[str, float]:
    """One training pass of the FFN fc2(gelu(fc1(x))), GELU included: BF16 nn.Sequential vs FP8 rowwise linears
    vs the fused channel-recipe FFN (GELU and its backward inside the quantizers; fast-accum fprop)."""
    from torch import nn

    from megatron_longlive.quant.fp8_ffn import FP8GeluFFN

    dev = torch.device(a.device)
    seq = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)).to(dev, torch.bfloat16)
    wrap = lambda recipe, fast_bwd=False: [  # noqa: E731
        FP8Linear.from_linear(m, emulate=False, fast_accum=True, recipe=recipe, fast_accum_backward=fast_bwd)
        if isinstance(m, nn.Linear) else m for m in seq]
    rowwise, channel = nn.Sequential(*wrap("rowwise")), FP8GeluFFN(*wrap("channel_delayed"))
    channel_fast = FP8GeluFFN(*wrap("channel_delayed", fast_bwd=True))      # quant.fp8_fast_accum_backward
    x = torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16)

    def step(mod):
        def run():
            x.grad = None
            for p in seq.parameters():
                p.grad = None
            mod(x).backward(dy)
        return run

    if a.profile:
        for label, mod in (("bf16", seq), ("channel fused", channel)):
            step(mod)()
            print_kernels(f"FFN {tokens}x{dim}->{hidden} {label}", top_kernels(step(mod), dev, 12))
    return {"ffn bf16 graphed": graphed_ms(step(seq), a.warmup, a.iters),
            "ffn fp8 rowwise graphed": graphed_ms(step(rowwise), a.warmup, a.iters),
            "ffn fp8 channel_delayed fused graphed": graphed_ms(step(channel), a.warmup, a.iters),
            "ffn fp8 channel_delayed fused fast-accum all graphed": graphed_ms(step(channel_fast), a.warmup, a.iters),
            "ffn bf16": cuda_time_ms(step(seq), a.warmup, a.iters),
            "ffn fp8 rowwise": cuda_time_ms(step(rowwise), a.warmup, a.iters),
            "ffn fp8 channel_delayed fused": cuda_time_ms(step(channel), a.warmup, a.iters)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[32760, 65520],
                   help="rows of x, one table each (1.3B: 21 latent frames x 1560 = 32760; the teacher-forcing "
                        "sequence holds clean and noisy latents: 65520)")
    p.add_argument("--models", nargs="+", default=["1.3b", "5b"], choices=sorted(SHAPES))
    p.add_argument("--shapes", nargs="+", default=None, help="override: IN:OUT pairs, e.g. 64:128")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke run of this script")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    p.add_argument("--profile", action="store_true", help="print each pass's top device kernels (BF16, channel)")
    a = p.parse_args(argv)
    shapes = {m: SHAPES[m] for m in a.models}
    if a.shapes:
        shapes = {"custom": [tuple(int(v) for v in s.split(":")) for s in a.shapes]}
    if a.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        print("bench_fp8_linear: needs a CUDA GPU with FP8 tensor cores (sm89+, e.g. H100)", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth(a) if a.device == "cuda" else 1e11
    print(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    for tokens in a.tokens:
        bench_tokens(tokens, shapes, a, bandwidth)
    return 0


def bench_tokens(tokens: int, shapes: dict, a, bandwidth: float) -> None:
    """The eager table, the graphed table, then (model shapes only) the FFN table, for one token count."""
    print(f"\ntokens {tokens}, eager (host launches included)")
    print(f"{'model':6} {'in->out':>13} {'bf16 ms':>8} {'fp8 ms':>8} {'speedup':>8} {'gemm ms':>8} {'fast ms':>8} "
          f"{'quant ms':>9} {'floor ms':>9} {'other ms':>9} {'best':>6} {'fp8 TF/s':>9} {'gemm TF/s':>10} "
          f"{'blk ms':>7} {'blk best':>8} {'fast-fprop':>10} {'ch ms':>7} {'ch quant':>8} {'ch speedup':>10}")
    graphed, details = [], []
    for model, pairs in shapes.items():
        for k, n in pairs:
            t = bench_shape(tokens, k, n, a, bandwidth)
            flops = 3 * 2 * tokens * k * n
            tf = {key: flops / (t[key] * 1e-3) / 1e12 for key in ("bf16", "fp8", "fp8 gemm-only",
                                                                   "fp8 gemm-only fast-accum")}
            speedup = t["bf16"] / t["fp8"]
            fast_speedup = t["bf16"] / t["fp8 fast-accum fprop"]
            channel_speedup = t["bf16"] / t["fp8 channel_delayed"]
            other = t["fp8"] - t["fp8 gemm-only"] - t["fp8 quantize x+w+dy"]
            best = t["bf16"] / (t["fp8 gemm-only"] + t["fp8 quantize floor"])
            blk_best = t["bf16"] / (t["fp8 gemm-only blockwise 1x128"] + t["fp8 quantize floor"] * 4 / 6)
            print(f"{model:6} {f'{k}->{n}':>13} {t['bf16']:8.3f} {t['fp8']:8.3f} {speedup:7.2f}x "
                  f"{t['fp8 gemm-only']:8.3f} {t['fp8 gemm-only fast-accum']:8.3f} {t['fp8 quantize x+w+dy']:9.3f} "
                  f"{t['fp8 quantize floor']:9.3f} {other:9.3f} {best:5.2f}x {tf['fp8']:9.0f} "
                  f"{tf['fp8 gemm-only']:10.0f} {t['fp8 gemm-only blockwise 1x128']:7.3f} {blk_best:7.2f}x "
                  f"{fast_speedup:9.2f}x {t['fp8 channel_delayed']:7.3f} {t['fp8 channel_delayed quantize x+w+dy']:8.3f} "
                  f"{channel_speedup:9.2f}x")
            name = f"linear {model} {tokens}x{k}->{n} fwd+dgrad+wgrad"
            for key in (key for key in t if t[key] == t[key]):           # NaN: not measured here
                metric, unit = (("relative error", "") if key.endswith("relative error") else
                                ("scale", "") if key.endswith("scale vs promoted") else
                                ("sm clock", "MHz") if key.endswith("clock under load") else
                                ("power", "W") if key.endswith("power under load") else ("time", "ms"))
                record(a.out, f"{name} {key}", metric, round(t[key], 6 if unit == "" else 4), unit)
                if key in tf:
                    record(a.out, f"{name} {key}", "throughput", round(tf[key], 1), "TFLOP/s")
            record(a.out, name, "fp8 speedup over bf16", round(speedup, 3), "x")
            record(a.out, name, "fp8 fast-accum fprop speedup over bf16", round(fast_speedup, 3), "x")
            record(a.out, name, "fp8 channel_delayed speedup over bf16", round(channel_speedup, 3), "x")
            record(a.out, name, "fp8 best speedup at the quantization byte floor", round(best, 3), "x")
            if blk_best == blk_best:
                record(a.out, name, "fp8 blockwise best speedup at its byte floor", round(blk_best, 3), "x")
            g = [t["bf16 graphed"], t["fp8 fast-accum fprop graphed"], t["fp8 channel_delayed graphed"],
                 t["fp8 channel_delayed fast-accum all graphed"]]
            graphed.append((model, k, n, g))
            details.append((model, k, n, t))
            if g[0] == g[0]:
                record(a.out, name, "fp8 rowwise (fast fprop) speedup over bf16, both graphed", round(g[0] / g[1], 3),
                       "x")
                record(a.out, name, "fp8 channel_delayed speedup over bf16, both graphed", round(g[0] / g[2], 3), "x")
                record(a.out, name, "fp8 channel_delayed fast-accum all speedup over bf16, both graphed",
                       round(g[0] / g[3], 3), "x")
    print(f"\ntokens {tokens}: fast accumulation's relative error per GEMM (vs promoted), the SM clock / power"
          " sampled under load, and each GEMM alone (bf16 / fp8 exact accumulation)")
    for model, k, n, t in details:
        errs = " ".join(f"{g} {t[f'fp8 {g} fast-accum relative error']:.2e} "
                        f"(scale {t[f'fp8 {g} fast-accum scale vs promoted']:.6f}; vs exact: promoted "
                        f"{t.get(f'fp8 {g} promoted vs bf16 operands exact relative error', float('nan')):.2e}, fast "
                        f"{t.get(f'fp8 {g} fast-accum vs bf16 operands exact relative error', float('nan')):.2e})"
                        for g in ("fprop", "dgrad", "wgrad"))
        clk = " ".join(f"{lbl}: {t.get(f'{lbl} sm clock under load', float('nan')):.0f} MHz "
                       f"{t.get(f'{lbl} power under load', float('nan')):.0f} W"
                       for lbl in ("bf16", "fp8 gemm-only fast-accum"))
        gemm = " ".join(f"{g} {t[f'bf16 {g} gemm']:.3f}/{t[f'fp8 {g} gemm']:.3f} ms" for g in ("fprop", "dgrad", "wgrad"))
        gemm += (f" (fp8 wgrad in 2 halves {t['fp8 wgrad gemm split in 2']:.3f} ms; dgrad+wgrad sequential "
                 f"{t.get('fp8 dgrad+wgrad sequential', float('nan')):.3f}, on two streams "
                 f"{t.get('fp8 dgrad+wgrad concurrent', float('nan')):.3f} ms)")
        print(f"{model:6} {f'{k}->{n}':>13} {errs} | {clk} | bf16/fp8 {gemm}")
    print(f"\ntokens {tokens}, CUDA-graphed (device time, no host launch cost)")
    print(f"{'model':6} {'in->out':>13} {'bf16 ms':>8} {'rowwise ms':>11} {'x':>6} {'channel ms':>11} {'x':>6} "
          f"{'ch fast-all ms':>15} {'x':>6}")
    for model, k, n, (b, r, c, f) in graphed:
        print(f"{model:6} {f'{k}->{n}':>13} {b:8.3f} {r:11.3f} {b / r:5.2f}x {c:11.3f} {b / c:5.2f}x {f:15.3f} "
              f"{b / f:5.2f}x")
    if "custom" in shapes:
        return
    print(f"\n{'FFN (GELU incl.)':24} {'bf16 ms':>8} {'rowwise ms':>11} {'x':>6} {'channel fused ms':>17} {'x':>6}"
          f" {'graphed: bf16':>14} {'rowwise':>8} {'x':>6} {'fused':>8} {'x':>6} {'fast-all':>9} {'x':>6}")
    for model in shapes:
        dim, hidden = FFNS[model]
        t = bench_ffn(tokens, dim, hidden, a)
        r, c = t["ffn bf16"] / t["ffn fp8 rowwise"], t["ffn bf16"] / t["ffn fp8 channel_delayed fused"]
        gb, gr, gc, gf = (t[f"ffn {v} graphed"] for v in ("bf16", "fp8 rowwise", "fp8 channel_delayed fused",
                                                          "fp8 channel_delayed fused fast-accum all"))
        print(f"{f'{model} {dim}->{hidden}->{dim}':24} {t['ffn bf16']:8.3f} {t['ffn fp8 rowwise']:11.3f} {r:5.2f}x "
              f"{t['ffn fp8 channel_delayed fused']:17.3f} {c:5.2f}x {gb:14.3f} {gr:8.3f} {gb / gr:5.2f}x {gc:8.3f} "
              f"{gb / gc:5.2f}x {gf:9.3f} {gb / gf:5.2f}x")
        name = f"ffn {model} {tokens}x{dim}->{hidden}->{dim} fwd+bwd (gelu incl.)"
        for key, v in t.items():
            if v == v:
                record(a.out, f"{name} {key}", "time", round(v, 4), "ms")
        record(a.out, name, "fp8 rowwise speedup over bf16", round(r, 3), "x")
        record(a.out, name, "fp8 channel_delayed fused speedup over bf16", round(c, 3), "x")
        if gb == gb:
            record(a.out, name, "fp8 channel_delayed fused speedup over bf16, both graphed", round(gb / gc, 3), "x")
            record(a.out, name, "fp8 channel_delayed fused fast-accum all speedup over bf16, both graphed",
                   round(gb / gf, 3), "x")


if __name__ == "__main__":
    sys.exit(main())
