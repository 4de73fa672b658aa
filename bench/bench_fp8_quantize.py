"""Bandwidth of the channel recipe's FP8 quantizer (quant/fp8_channel_triton.py) as a fraction of a device copy.

The channel quantizer is the FP8 training linear's only pass over activations (x forward, dy backward), so its
bandwidth sets how much of the FP8 GEMMs' speedup a layer keeps. Bytes per value: read 2 (BF16 t) + 2 more for
gelu_backward (h), write 2 (the E4M3 codes in both layouts); a copy of t moves 4. Per shape (tokens x channels
of the 1.3B / 5B activations) and op (identity: x or dy; identity + column sums: dy with the bias gradient; gelu:
fc2's input from fc1's output; gelu_backward: fc1's dy), CUDA-graphed:
  us          one call, device time
  frac        bytes moved / time / copy bandwidth (1.0 = as fast as a copy moving those bytes)
  codes/trans us  exploration: the tuned config storing only the row-major codes / only the transposed ones
  tile-stats  exploration: the tuned config reducing its column stats across rows per tile (the earlier kernel)
  unpinned    exploration: the tuned config without PIN_CODES (the compiler recomputes the codes, GELU included,
              for the transposed store: the session-15 kernel)
  tuned       the autotuner's pick (BM x BK, warps, pipeline stages); `best cfg` / `best frac`: every
              config timed directly (its codes checked equal to the tuned call's)
The rowwise recipe's two-pass quantize_both is timed alongside (6 bytes per value; its `frac` counts them).

  python bench/bench_fp8_quantize.py --out bench/results.jsonl          # needs CUDA
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_fp8_linear import copy_bandwidth, graphed_ms  # noqa: E402
from bench.record import record  # noqa: E402

SHAPES = [(65520, 1536), (65520, 3072), (65520, 8960), (32760, 8960), (32760, 14336)]
OPS = ("identity", "identity+sum", "gelu", "gelu_backward")


def op_call(t, h, inv, amax, op: str):
    from megatron_longlive.quant.fp8_channel_triton import quantize_channelwise

    if op == "identity+sum":
        return lambda: quantize_channelwise(t, inv, amax, col_sum=True)
    return lambda: quantize_channelwise(t, inv, amax, op=op, h=h if op == "gelu_backward" else None)


def config_sweep(t, h, inv, amax, op: str, a, want) -> list[tuple[str, float]]:
    """(config label, ms) of the kernel at every autotune config, launched directly (no tuner); each config's
    codes must equal `want` (the tuned call's) byte for byte."""
    from megatron_longlive.quant.fp8_channel_triton import CONFIGS, quantize_channelwise

    out = []
    for c in CONFIGS:
        run = lambda c=c: quantize_channelwise(t, inv, amax, col_sum=op == "identity+sum",  # noqa: E731
                                               op=op.removesuffix("+sum"), h=h, config=c)
        got = run()
        for g, w in zip(got[:2], want[:2]):
            if not torch.equal(g.view(torch.uint8), w.view(torch.uint8)):
                raise AssertionError(f"{op} config {c}: codes differ from the tuned call's")
        label = f"{c['BM']}x{c['BK']} w{c['num_warps']} s{c['NUM_STAGES']}"
        out.append((label, graphed_ms(run, a.warmup, a.iters)))
    return out


def store_split(t, h, inv, amax, op: str, a, best) -> dict[str, float]:
    """Exploration: ms of the tuned config with only the row-major codes stored, with only the transposed ones (the
    kernel's STORES flag: which layout costs what), with its column stats reduced per tile (TILE_STATS) and with
    the codes recomputed for the transposed store (PIN_CODES=False)."""
    from megatron_longlive.quant.fp8_channel_triton import CONFIGS, quantize_channelwise

    config = CONFIGS[0] if best is None else dict(best.kwargs, num_warps=best.num_warps)
    config.pop("ROW_TILES", None)
    out = {}
    for label, flags in (("codes only", dict(STORES=1)), ("transposed only", dict(STORES=2)),
                         ("stats per tile", dict(TILE_STATS=True)), ("unpinned", dict(PIN_CODES=False))):
        run = lambda flags=flags: quantize_channelwise(  # noqa: E731
            t, inv, amax, col_sum=op == "identity+sum", op=op.removesuffix("+sum"), h=h, config=dict(config, **flags))
        out[label] = graphed_ms(run, a.warmup, a.iters)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="override: TOKENSxCHANNELS, e.g. 4096x1536")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_quantize: needs CUDA (the kernels' speed is the point)", file=sys.stderr)
        return 2
    from megatron_longlive.quant.fp8 import quantize_both
    from megatron_longlive.quant.fp8_channel_triton import _channel_quantize_tuned

    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes] if a.shapes else SHAPES
    a.device = "cuda"
    bw = copy_bandwidth(a)
    print(f"device copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'shape':>13} {'op':>14} {'us':>8} {'frac':>6} {'tuned':>14} {'best cfg':>14} {'best frac':>9} "
          f"{'codes us':>9} {'trans us':>9} {'tile-stats':>10} {'unpinned':>9}")
    for m, k in shapes:
        t = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        inv = torch.full((k,), 64.0, device="cuda")
        amax = torch.zeros(k, dtype=torch.int32, device="cuda")
        for op in a.ops:
            nbytes = m * k * (6 if op == "gelu_backward" else 4)
            call = op_call(t, h, inv, amax, op)
            ms = graphed_ms(call, a.warmup, a.iters)
            best = getattr(_channel_quantize_tuned, "best_config", None)
            tuned = (f"{best.kwargs['BM']}x{best.kwargs['BK']} w{best.num_warps} s{best.kwargs['NUM_STAGES']}"
                     if best else "-")
            sweep = config_sweep(t, h if op == "gelu_backward" else None, inv, amax, op, a, call())
            cfg, cfg_ms = min(sweep, key=lambda r: r[1])
            frac, best_frac = nbytes / (ms * 1e-3) / bw, nbytes / (cfg_ms * 1e-3) / bw
            split = store_split(t, h if op == "gelu_backward" else None, inv, amax, op, a, best)
            print(f"{f'{m}x{k}':>13} {op:>14} {ms * 1e3:8.1f} {frac:6.2f} {tuned:>14} {cfg:>14} {best_frac:9.2f} "
                  f"{split['codes only'] * 1e3:9.1f} {split['transposed only'] * 1e3:9.1f} "
                  f"{split['stats per tile'] * 1e3:10.1f} {split['unpinned'] * 1e3:9.1f}")
            name = f"fp8 channel quantize {m}x{k} {op}"
            record(a.out, name, "time", round(ms * 1e3, 2), "us", tuned=tuned)
            record(a.out, name, "fraction of copy bandwidth", round(frac, 3), "ratio", best_config=cfg,
                   best_config_fraction=round(best_frac, 3), sweep={c: round(v * 1e3, 2) for c, v in sweep},
                   **{f"{key} us": round(v * 1e3, 2) for key, v in split.items()})
        ms = graphed_ms(lambda: quantize_both(t, pad=128), a.warmup, a.iters)
        frac = 6 * m * k / (ms * 1e-3) / bw
        print(f"{f'{m}x{k}':>13} {'rowwise both':>14} {ms * 1e3:8.1f} {frac:6.2f}")
        record(a.out, f"fp8 rowwise quantize_both {m}x{k}", "fraction of copy bandwidth", round(frac, 3), "ratio",
               time_us=round(ms * 1e3, 2))
        del t, h
    return 0


if __name__ == "__main__":
    sys.exit(main())
