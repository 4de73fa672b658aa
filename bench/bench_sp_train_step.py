"""Teacher-forcing training step time and peak memory per rank under Balanced or naive SP (torchrun).

Runs the real trainer with `longlive train`'s parallel strategy (grid, Ulysses SP plan, gradient
all-reduce) on random latents; rank 0 prints a per-rank table and appends JSON lines (bench/record.py)
to --out: step time, peak memory, and the all-to-all share of one extra profiled step (NCCL all-to-all kernel
time / step time on CUDA; with the NCCL_* settings of the run, e.g. NCCL_NVLS_ENABLE=0 for multicast off). GPU (one process per GPU; SP = world size unless --sp is given, DP = the rest):

  torchrun --nproc_per_node 2 bench/bench_sp_train_step.py --latent-frames 24 48 96 --layout balanced --out bench/results.jsonl
  torchrun --nproc_per_node 2 bench/bench_sp_train_step.py --latent-frames 24 48 96 --layout naive --out bench/results.jsonl
  torchrun --nproc_per_node 1 bench/bench_sp_train_step.py --latent-frames 24 48 96 --out bench/results.jsonl   # SP=1
  torchrun --nproc_per_node 2 bench/bench_sp_train_step.py --latent-frames 24 48 96 --quant fp8 --out bench/results.jsonl

CPU smoke test: torchrun --nproc_per_node 2 bench/bench_sp_train_step.py --preset tiny --latent-frames 4 --height 64 --width 64 --chunk-frames 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from dataloaders.latent_dataset import random_latent_dataset  # noqa: E402
from megatron_longlive.config import build_config  # noqa: E402
from megatron_longlive.distributed.strategy import build_parallel_training  # noqa: E402
from megatron_longlive.training.trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--latent-frames", type=int, nargs="+", default=[24, 48, 96],
                   help="latent frames per clip (each a multiple of chunk-frames * sp)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--sp", type=int, default=0, help="SP degree (0: the world size)")
    p.add_argument("--layout", choices=["balanced", "naive"], default="balanced")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--quant", choices=["bf16", "fp8", "nvfp4_emulated"], default="bf16",
                   help="quant.linear: the training linears (fp8: E4M3 GEMMs on Hopper; nvfp4_emulated: exact NVFP4 "
                        "numerics anywhere, not a speed path)")
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


A2A = r"alltoall|all_to_all|SendRecv|AllToAll"   # the c10d op (gloo: blocking, self time) / NCCL's kernels (CUDA)


def all_to_all_share(trainer, device: torch.device) -> tuple[float, float]:
    """(all-to-all ms, step ms) of one profiled step: NCCL all-to-all kernel time on CUDA, the blocking c10d
    all-to-all op's own time on CPU (gloo). The step time includes the profiler's overhead."""
    from bench.profiling import matching_ms, top_kernels

    box = {}

    def step():
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        box["ms"] = 1e3 * (time.perf_counter() - t0)

    dist.barrier()
    rows = top_kernels(step, device, n=None)
    return matching_ms(rows, A2A), box["ms"]


def run_length(a, frames: int, sp: int, run_dir: str) -> tuple[float, float, int, float, float]:
    """Median step seconds, this rank's peak GiB, tokens per rank, and (all-to-all ms, step ms) of one profiled
    step for one clip length."""
    cuda = torch.cuda.is_available()
    cfg = build_config({
        "model": {"preset": a.preset},
        "parallel": {"sp_size": sp, "sp_layout": a.layout},
        "quant": {"linear": a.quant},
        "data": {"source": "zarr", "path": os.path.join(run_dir, "none"), "height": a.height, "width": a.width,
                 "num_frames": 1 + 4 * (frames - 1)},
        "train": {"output_dir": run_dir, "max_steps": a.warmup + a.steps + 1, "save_interval": 10**9,
                  "wandb_mode": "disabled", "chunk_frames": a.chunk_frames, "precision": a.precision,
                  "activation_checkpointing": cuda and not a.no_activation_checkpointing, "warmup_steps": 1,
                  "lr": 1e-5}})
    parallel = build_parallel_training(cfg)
    trainer = Trainer(cfg, dataset=random_latent_dataset(cfg, 2), progress=False, **parallel)
    times, tokens = [], 0
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
            if i == a.warmup:
                torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        t0 = time.perf_counter()
        m = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens = round(m["tokens_per_s"] * m["step_time"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    a2a_ms, prof_ms = all_to_all_share(trainer, torch.device("cuda" if cuda else "cpu"))
    del trainer, parallel
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times), peak, tokens, a2a_ms, prof_ms


def main(argv=None) -> int:
    a = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    sp = a.sp or world
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in a.latent_frames:
            step_s, peak, tokens, a2a_ms, prof_ms = run_length(a, frames, sp, os.path.join(tmp, f"f{frames}"))
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, (step_s, peak, tokens, a2a_ms, prof_ms))
            if dist.get_rank() == 0:
                quant = "" if a.quant == "bf16" else f" linear {a.quant}"
                name = (f"{a.preset} TF step {frames}x{a.height}x{a.width} chunk{a.chunk_frames} sp{sp} {a.layout} "
                        f"world{dist.get_world_size()} {a.precision}{quant}")
                worst = max(r[0] for r in per_rank)
                rows.append(record(a.out, name, "step_time", round(worst * 1e3, 2), "ms",
                                   per_rank_ms=[round(r[0] * 1e3, 2) for r in per_rank],
                                   per_rank_peak_gib=[round(r[1], 2) for r in per_rank],
                                   tokens_per_rank=per_rank[0][2]))
                rows.append(record(a.out, name, "peak_memory_max", round(max(r[1] for r in per_rank), 2), "GiB"))
                shares = [r[3] / r[4] for r in per_rank]
                nccl = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM_MEM"))}
                rows.append(record(a.out, name, "all_to_all_share", round(max(shares), 4), "ratio",
                                   per_rank_share=[round(x, 4) for x in shares],
                                   per_rank_all_to_all_ms=[round(r[3], 2) for r in per_rank],
                                   per_rank_profiled_step_ms=[round(r[4], 2) for r in per_rank], nccl_env=nccl))
    if dist.get_rank() == 0:
        print(f"{'name':<78} {'metric':<16} {'value':>10} unit   per rank")
        for r in rows:
            extra = r.get("per_rank_ms") or r.get("per_rank_share") or ""
            print(f"{r['name']:<78} {r['metric']:<16} {r['value']:>10} {r['unit']:<6} {extra}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
