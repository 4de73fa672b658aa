"""Run one of the repository's benchmark scripts (bench/*.py); GPU figures are appended with --out bench/results.jsonl.

`longlive bench generate --settings wan2.1-1.3b --steps compile+cuda_graph` runs bench/bench_generate_chunk.py
with the arguments after the benchmark name (`longlive bench NAME --help` shows them). The scripts live in the
source checkout (they are not part of an installed wheel), next to the package.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

BENCHMARKS = {
    "generate": "bench_generate_chunk.py",     # streaming DiT chunk step: eager / compile / CUDA graph, FP8, NVFP4 KV
    "e2e": "bench_e2e.py",                      # DiT + streaming VAE decode, frames delivered
    "vae": "bench_vae.py",                      # streaming VAE decoder vs diffusers
    "train": "bench_train_step.py",             # teacher-forcing step, precision variants
    "sp-train": "bench_sp_train_step.py",       # balanced-SP training step under torchrun
    "distill": "bench_distill_step.py",         # DMD step, BF16 vs NVFP4 base
    "kv-attention": "bench_kv_attention.py",    # attention over the KV window, BF16 vs fused NVFP4
    "fp8-linear": "bench_fp8_linear.py",
    "nvfp4": "bench_nvfp4.py",
    "data": "bench_data.py",
    "memory": "memory_account.py",
}


def bench_dir() -> str:
    import megatron_longlive

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(megatron_longlive.__file__))), "bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (NAME --help lists them)")


def run(args: argparse.Namespace) -> int:
    path = os.path.join(bench_dir(), BENCHMARKS[args.benchmark])
    if not os.path.isfile(path):
        print(f"error: {path} not found: the benchmark scripts ship with the source checkout, not the wheel. "
              f"Fix: clone the repository and `pip install -e .`", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [path, *args.args]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:          # the scripts end with sys.exit(main())
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
