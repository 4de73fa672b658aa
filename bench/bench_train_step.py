"""Time teacher-forcing training steps (forward + backward + AdamW) of a model config.

CPU default: the tiny preset. GPU default: Wan2.1-1.3B at 480x832, 21 latent frames, chunk 3, BF16
autocast, activation checkpointing. Prints a table and appends JSON lines (bench/record.py) to --out.

  python bench/bench_train_step.py --out bench/results.jsonl                       # tiny on CPU
  python bench/bench_train_step.py --preset wan2.1-1.3b --out bench/results.jsonl  # on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from dataloaders.latent_dataset import random_latent_dataset  # noqa: E402
from megatron_longlive.config import build_config  # noqa: E402
from megatron_longlive.models.wan import WanDiT  # noqa: E402
from megatron_longlive.training.trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-1.3b" if cuda else "tiny")
    p.add_argument("--latent-frames", type=int, default=21 if cuda else 4, help="latent frames per clip")
    p.add_argument("--height", type=int, default=480 if cuda else 64, help="pixel height")
    p.add_argument("--width", type=int, default=832 if cuda else 64, help="pixel width")
    p.add_argument("--chunk-frames", type=int, default=3 if cuda else 1)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, allocator)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    ac = device.type == "cuda" and not a.no_activation_checkpointing
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = build_config({
            "model": {"preset": a.preset},
            "data": {"source": "zarr", "path": os.path.join(run_dir, "none.pt"), "height": a.height, "width": a.width,
                     "num_frames": 1 + 4 * (a.latent_frames - 1)},
            "train": {"output_dir": run_dir, "max_steps": a.warmup + a.steps, "wandb_mode": "disabled",
                      "micro_batch": a.micro_batch, "chunk_frames": a.chunk_frames, "precision": a.precision,
                      "activation_checkpointing": ac, "lora_rank": a.lora_rank, "warmup_steps": 1, "lr": 1e-5}})
        torch.manual_seed(0)
        with torch.device(device):
            model = WanDiT(cfg.model)
            model.init_weights()
        trainer = Trainer(cfg, dataset=random_latent_dataset(cfg, a.micro_batch), device=device, model=model,
                          progress=False)
        times, tokens = [], 0
        for i in range(a.warmup + a.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
                if i == a.warmup:
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            m = trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
                tokens = m["tokens_per_s"] * m["step_time"]
    step_s = statistics.median(times)
    name = (f"{a.preset} train step {a.latent_frames}x{a.height}x{a.width} chunk{a.chunk_frames} mb{a.micro_batch} "
            f"{a.precision}{' ac' if ac else ''}{f' lora{a.lora_rank}' if a.lora_rank else ''}")
    rows = [record(a.out, name, "step_time", round(step_s * 1e3, 2), "ms"),
            record(a.out, name, "tokens_per_s", round(tokens / step_s, 1), "tokens/s", tokens_per_step=int(tokens))]
    if device.type == "cuda":
        rows.append(record(a.out, name, "peak_memory", round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB"))
    print(f"{'name':<60} {'metric':<14} {'value':>12} unit")
    for r in rows:
        print(f"{r['name']:<60} {r['metric']:<14} {r['value']:>12} {r['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
