"""Time teacher-forcing training steps (forward + backward + AdamW) of a model config, per training precision.

CPU default: the tiny preset. GPU default: Wan2.1-1.3B at 480x832, 21 latent frames, chunk 3, BF16
autocast, activation checkpointing. `--quant` picks one or more precision variants (bench/train_variants.py:
bf16, fp8, nvfp4_emulated, nvfp4_lora, nvfp4_lora_offload), each built as training builds it (providers /
packed base + LoRA / activation offload), run one after another in this process. Per variant: step time,
tokens/s, peak memory (CUDA max_memory_allocated after the warm-up steps) and the training-state bytes
(weights + grads + AdamW, from the real tensors), each with its ratio to bf16 when bf16 is in the run.
Prints a table and appends JSON lines (bench/record.py) to --out; where the activation memory goes is
accounted by bench/activation_account.py. A variant that fails (OOM, CUDA error, NaN) is reported with its
error and the script exits with status 1.

  python bench/bench_train_step.py --out bench/results.jsonl                       # tiny on CPU
  python bench/bench_train_step.py --preset wan2.1-1.3b --out bench/results.jsonl  # on a GPU
  python bench/bench_train_step.py --quant bf16 fp8 nvfp4_emulated nvfp4_lora --out bench/results.jsonl
  python bench/bench_train_step.py --quant bf16 nvfp4_lora nvfp4_lora_offload --steps 2 --warmup 1  # issue 6
"""
from __future__ import annotations

import argparse
import os
import gc
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from dataloaders.latent_dataset import random_latent_dataset  # noqa: E402
from megatron_longlive.config import build_config  # noqa: E402
from bench.memory_account import measured_state_bytes  # noqa: E402
from bench.train_variants import VARIANTS, build_variant_model, count_quantized, variant_tree  # noqa: E402
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
    p.add_argument("--quant", nargs="+", default=["bf16"], choices=VARIANTS, metavar="VARIANT",
                   help=f"precision variants to time, in order ({', '.join(VARIANTS)}); ratios are to bf16")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="LoRA rank: of nvfp4_lora (0: 16), and an optional LoRA on the other variants (0: none)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, allocator)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    p.add_argument("--compile-elementwise", choices=["off", "on"], default="off",
                   help="train.compile_elementwise: the DiT's norms, modulation, gated residuals and RoPE as "
                        "torch.compile'd kernels (row names get ' compiled-ops')")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step per variant: its top device kernels and their "
                        "time per category (GEMMs, attention, quantizers, the rest)")
    a = p.parse_args(argv)
    if len(set(a.quant)) != len(a.quant):
        p.error(f"--quant lists a variant twice: {a.quant}")
    if torch.device(a.device).type == "cuda" and not cuda:
        p.error(f"--device {a.device}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}). Fix: run on a GPU machine or pass --device cpu")
    return a


def run_variant(a, variant: str, run_dir: str) -> dict:
    """Build `variant` as training does, run warm-up + timed Trainer steps; returns its figures."""
    device = torch.device(a.device)
    ac = device.type == "cuda" and not a.no_activation_checkpointing
    tree = variant_tree(variant, a.lora_rank)
    cfg = build_config({
        "model": {"preset": a.preset},
        "data": {"source": "zarr", "path": os.path.join(run_dir, "none.pt"), "height": a.height, "width": a.width,
                 "num_frames": 1 + 4 * (a.latent_frames - 1)},
        "quant": tree["quant"],
        "train": {"output_dir": os.path.join(run_dir, variant), "max_steps": a.warmup + a.steps + int(a.profile),
                  "wandb_mode": "disabled", "micro_batch": a.micro_batch, "chunk_frames": a.chunk_frames,
                  "precision": a.precision, "activation_checkpointing": ac, "warmup_steps": 1, "lr": 1e-5,
                  "compile_elementwise": a.compile_elementwise,
                  **tree["train"]}})
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_variant_model(cfg, device)
    counts = count_quantized(model)
    expected = {"fp8": "FP8Linear", "nvfp4_emulated": "NVFP4Linear",
                "nvfp4_lora": "PackedNVFP4Linear"}.get(variant.removesuffix("_offload"))
    if expected and counts[expected] == 0:
        raise RuntimeError(f"variant {variant}: the model holds no {expected} (all linears kept high precision?)")
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
    profiled = profile_step(trainer, variant, device) if a.profile else {}
    out = {"step_time": (round(step_s * 1e3, 2), "ms"), "tokens_per_s": (round(tokens / step_s, 1), "tokens/s"),
           "state_memory": (round(measured_state_bytes(trainer.model, trainer.optimizer)["total"] / 2**20, 2), "MiB")}
    if device.type == "cuda":
        out["peak_memory"] = (round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB")
    out.update({f"profiled step device time{'' if cat == 'total' else ' in ' + cat}": (round(ms, 1), "ms")
                for cat, ms in profiled.items()})
    info = {"tokens_per_step": int(tokens), "quantized_modules": {k: v for k, v in counts.items() if v},
            "trainable_params": sum(p.numel() for p in trainer.params), "lora_rank": cfg.train.lora_rank}
    if trainer.offload is not None:  # bytes of block inputs held in host memory per micro-batch (measured)
        info["offloaded_mib_per_micro_batch"] = round(
            trainer.offload.offloaded_bytes / (a.warmup + a.steps) / cfg.train.grad_accum / 2**20, 1)
    del trainer, model
    gc.collect()
    return {"figures": out, "info": info, "ac": ac}


# kernel-name patterns per category (the first match wins), for --profile's split of one step's device time
KERNEL_CATEGORIES = (("fp8 gemm", r"e4m3|f8f8|fp8.*gemm|gemm.*fp8|scaled_mm"),
                     ("attention", r"flash|fmha|attention|sdpa|cudnn"),
                     ("gemm", r"gemm|xmma|cutlass|cublas|sm90_|ampere_|nvjet"),
                     ("fp8 quantizers (triton)", r"quantize|_roll_kernel|amax|e4m3_bits"),
                     ("other triton", r"triton"),
                     ("elementwise / reductions", r"elementwise|reduce|vectorized|unrolled|layer_norm|norm"))


def profile_step(trainer, variant: str, device: torch.device) -> dict[str, float]:
    """One more training step under the profiler: prints its top kernels and the device time per KERNEL_CATEGORIES;
    returns {"total": ms, category: ms, ...}."""
    import re

    from bench.profiling import print_kernels, top_kernels

    rows = top_kernels(trainer.train_step, device, n=None)
    total = sum(ms for _, ms, _ in rows)
    print_kernels(f"{variant}, one step", rows[:25], total)
    split: dict[str, float] = {}
    for name, ms, _ in rows:
        cat = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, name, re.IGNORECASE)), "rest")
        split[cat] = split.get(cat, 0.0) + ms
    print(f"  {variant}: device time per category, one step: " +
          ", ".join(f"{c} {ms:.1f} ms ({ms / total:.0%})" for c, ms in sorted(split.items(), key=lambda r: -r[1])))
    return {"total": total, **split}


def record_variant(a, variant: str, r: dict, ref: dict | None) -> list[dict]:
    """Append one variant's figures to --out (at once, so a later variant's crash or a timeout keeps them)."""
    ac = torch.device(a.device).type == "cuda" and not a.no_activation_checkpointing
    base = (f"{a.preset} train step {a.latent_frames}x{a.height}x{a.width} chunk{a.chunk_frames} mb{a.micro_batch} "
            f"{a.precision}{' ac' if ac else ''}{' compiled-ops' if a.compile_elementwise == 'on' else ''}")
    rank = r["info"]["lora_rank"]
    name = base + (f" lora{rank}" if variant == "bf16" and rank else "")  # bf16: the pre-existing row names
    if variant != "bf16":
        name += f" {variant}" + (f" r{rank}" if rank else "")
    rows = []
    for metric, (value, unit) in r["figures"].items():
        extra = dict(variant=variant, **r["info"])
        if ref is not None and metric in ref["figures"] and ref["figures"][metric][0]:
            extra["ratio_to_bf16"] = round(value / ref["figures"][metric][0], 4)
        rows.append(record(a.out, name, metric, value, unit, **extra))
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    results, errors, rows = {}, {}, []
    with tempfile.TemporaryDirectory() as run_dir:
        for variant in a.quant:
            try:
                results[variant] = run_variant(a, variant, run_dir)
                rows += record_variant(a, variant, results[variant], results.get("bf16"))
            except Exception as e:  # keep the other variants' figures, then fail loudly
                traceback.print_exc()
                errors[variant] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if torch.device(a.device).type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
    print(f"{'name':<72} {'metric':<13} {'value':>11} {'unit':<9} {'x bf16':>7}")
    for r in rows:
        ratio = f"{r['ratio_to_bf16']:.3f}" if "ratio_to_bf16" in r else "-"
        print(f"{r['name']:<72} {r['metric']:<13} {r['value']:>11} {r['unit']:<9} {ratio:>7}")
    for variant, r in results.items():
        if "offloaded_mib_per_micro_batch" in r["info"]:
            print(f"{variant}: {r['info']['offloaded_mib_per_micro_batch']} MiB of block inputs per micro-batch waited "
                  f"in pinned host memory (train.offload_activations)")
    for variant, err in errors.items():
        print(f"FAILED {variant}: {err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
