"""DMD distillation step time and peak memory, BF16 base vs NVFP4-packed base (GPU; random weights).

One step = `critic_ratio` critic updates + one generator update (rollout chunk by chunk through the KV
cache, gradient through each chunk's last denoising step), as `longlive distill` runs it. Peak memory is
`torch.cuda.max_memory_allocated` over the warmup + timed steps (the resident frozen base, adapters,
optimizer states and activations; the setup peak - building and packing the base - is reported beside it).
On CPU the memory columns are NaN. Prints a table and appends JSON lines via bench/record.py.

    python bench/bench_distill_step.py --preset wan2.1-1.3b --base bf16 nvfp4 --out bench/results.jsonl
    python bench/bench_distill_step.py --preset tiny --height 32 --width 32 --device cpu   # smoke run
    python bench/bench_distill_step.py --base bf16 --activation-checkpointing [--offload-activations]

"offl GiB" is the block inputs sent to host memory per step (train.offload_activations; 0 without it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from megatron_longlive.config import build_config  # noqa: E402
from megatron_longlive.models.wan import WanDiT  # noqa: E402
from megatron_longlive.training import dmd  # noqa: E402

BASES = ("bf16", "nvfp4")
GIB = 2 ** 30


def _peak(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else float("nan")


def build_distiller(args, base: str) -> dmd.Distiller:
    """The tiny..1.3B model with random weights (--dtype; auto: BF16 on CUDA, fp32 elsewhere), NVFP4-packed for nvfp4,
    and a Distiller on it with random prompt embeddings; the Distiller applies train.activation_checkpointing /
    train.offload_activations (--activation-checkpointing / --offload-activations) as `longlive distill` does."""
    dev = torch.device(args.device)
    cfg = build_config({"model": {"preset": args.preset},
                        "train": {"chunk_frames": args.chunk_frames, "output_dir": "/tmp/bench_distill",
                                  "activation_checkpointing": args.activation_checkpointing,
                                  "offload_activations": args.offload_activations},
                        "quant": {"packed_base": base == "nvfp4"},
                        "distill": {"rollout_frames": args.rollout_frames, "critic_ratio": args.critic_ratio,
                                    "rank": args.rank, "critic_rank": args.rank, "real_guidance": args.guidance,
                                    "denoising_steps": args.steps_list, "output_dir": "/tmp/bench_distill",
                                    "init": args.init}})
    # initialised on the CPU generator, then moved: the same weights on every device (CUDA's RNG draws differ)
    torch.manual_seed(0)
    model = WanDiT(cfg.model)
    model.init_weights()
    # Wan's init zeroes the head: every score would be 0, the DMD gradient exactly 0 and the generator never move
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model.to(dev)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if dev.type == "cuda"
                                                                 else torch.float32)
    model.to(dtype)
    if base == "nvfp4":
        from megatron_longlive.quant.nvfp4.packed import pack_model

        pack_model(model, keep=cfg.quant.keep_high_precision, block_2d=cfg.quant.weight_2d)
    prompts = torch.randn(4, cfg.model.text_len, cfg.model.text_dim)        # CPU, as the dataset hands them over
    mode: dmd.ScoreMode = "causal" if args.init == "direct" else "bidirectional"
    return dmd.Distiller(cfg, model, prompts, mode, (args.height // 8, args.width // 8), dev)


def run_one(args, base: str) -> dict:
    """Build the distiller for `base`, time `--steps` train steps after `--warmup`; returns the figures and losses."""
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    d = build_distiller(args, base)
    setup_peak = _peak(dev)
    base_bytes = sum(t.numel() * t.element_size() for n, t in list(d.model.named_parameters())
                     + list(d.model.named_buffers()) if ".lora_" not in n)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    times, m = [], {}
    if d.offload is not None:
        d.offload.reset_counters()
    for i in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with autocast:
            m = d.train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"base": base, "step_s": sum(times) / len(times), "peak_gib": _peak(dev), "setup_peak_gib": setup_peak,
            "base_weights_gib": base_bytes / GIB, "critic_loss": m["critic_loss"],
            "generator_loss": m["generator_loss"],
            "offloaded_gib": d.offload.offloaded_bytes / GIB / (args.warmup + args.steps) if d.offload else 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--base", "--bases", dest="bases", nargs="+", default=list(BASES), choices=BASES,
                   help="frozen base weights: bf16 (plain) and/or nvfp4 (packed, 4.5 bits/value); one row each")
    p.add_argument("--init", default="direct", choices=["direct", "standalone"],
                   help="score layout: direct = teacher-forcing (causal), standalone = full attention")
    p.add_argument("--height", type=int, default=480, help="pixel height (latent = /8)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--rollout-frames", type=int, default=12, help="latent frames per rollout (paper: 32)")
    p.add_argument("--critic-ratio", type=int, default=5)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps-list", type=int, nargs="+", default=[1000, 500])
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="base weight dtype (auto: bf16 on CUDA, fp32 elsewhere); adapters always train in fp32")
    p.add_argument("--activation-checkpointing", action="store_true", help="train.activation_checkpointing")
    p.add_argument("--offload-activations", action="store_true",
                   help="train.offload_activations: checkpointed blocks' inputs in pinned host memory (needs "
                        "--activation-checkpointing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="append JSON lines here (bench/record.py)")
    args = p.parse_args(argv)
    if args.offload_activations and not args.activation_checkpointing:
        p.error("--offload-activations offloads what activation checkpointing saves: add --activation-checkpointing")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for base in args.bases:
        try:
            rows.append(run_one(args, base))
        except torch.cuda.OutOfMemoryError as e:  # record the failure instead of losing the other row
            rows.append({"base": base, **dict.fromkeys(("step_s", "peak_gib", "setup_peak_gib", "base_weights_gib",
                                                        "critic_loss", "generator_loss", "offloaded_gib"), float("nan")),
                         "error": str(e).splitlines()[0]})
    setting = (f"{args.preset} {args.height}x{args.width} rollout {args.rollout_frames} lat-frames chunk "
               f"{args.chunk_frames} critic_ratio {args.critic_ratio} r{args.rank} {args.init} "
               f"{len(args.steps_list)}-step{' AC' if args.activation_checkpointing else ''}"
               f"{'+offload' if args.offload_activations else ''}"
               f"{'' if args.dtype == 'auto' else ' ' + args.dtype}")
    print(f"DMD distillation step: {setting}")
    print(f"{'base':<8}{'step s':>10}{'peak GiB':>11}{'setup GiB':>11}{'base GiB':>10}{'critic':>10}{'gen':>10}{'offl GiB':>10}")
    for r in rows:
        print(f"{r['base']:<8}{r['step_s']:>10.3f}{r['peak_gib']:>11.2f}{r['setup_peak_gib']:>11.2f}"
              f"{r['base_weights_gib']:>10.3f}{r['critic_loss']:>10.4f}{r['generator_loss']:>10.4f}{r['offloaded_gib']:>10.3f}"
              + (f"  {r['error']}" if "error" in r else ""))
        name = f"{setting} {r['base']} base distill step"
        record(args.out, name, "step_time", r["step_s"], "s")
        record(args.out, name, "peak_memory", r["peak_gib"], "GiB", setup_peak_gib=r["setup_peak_gib"],
               base_weights_gib=r["base_weights_gib"], offloaded_gib_per_step=r["offloaded_gib"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
