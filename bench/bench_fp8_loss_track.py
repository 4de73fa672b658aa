"""Loss curves of FP8 training against BF16 at the real layer shapes, on a GPU (real FP8 GEMMs and accumulators).

The CPU tests check FP8 training against BF16 on the tiny model with emulated GEMMs (exact fp32 accumulation),
where the tensor cores' fast accumulator cannot be reproduced and the wgrad reduces over a few hundred tokens.
This runs the Wan2.1-1.3B block shapes (dim 1536, ffn 8960) with fewer blocks (--layers) at the trainer's
teacher-forcing sequence (21 latent frames of 480x832: 65520 tokens) for --steps AdamW steps per variant, every
variant from the same init, data, noise and timesteps (seeded), and compares the loss curves:
  gap max / gap end   max over steps / last step of |smoothed loss - reference's| / reference's (trailing mean
                      over --window steps), against bf16, and fp8_channel_fast against fp8_channel (what
                      quant.fp8_fast_accum_backward changes), and a `+compiled` variant (train.compile_elementwise=on)
                      against its eager self
Prints a table; appends JSON lines (bench/record.py) to --out: each variant's raw loss series, and the gaps.

  python bench/bench_fp8_loss_track.py --out bench/results.jsonl           # needs CUDA sm89+ (H100/H200)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from bench.train_variants import build_variant_model, variant_tree  # noqa: E402
from dataloaders.latent_dataset import random_latent_dataset  # noqa: E402
from megatron_longlive.config import build_config  # noqa: E402
from megatron_longlive.training.trainer import Trainer  # noqa: E402
from tools.compare_runs import smooth  # noqa: E402

BASE = ("bf16", "fp8_channel", "fp8_channel_fast", "fp8")
COMPILED = "+compiled"      # suffix: the same variant with train.compile_elementwise=on (models/compiled_ops.py)
CHOICES = BASE + tuple(v + COMPILED for v in BASE)


def losses(a, variant: str, run_dir: str) -> list[float]:
    """The loss of each of a.steps training steps of `variant` (bench/train_variants.py, optionally +compiled),
    seeded like every other."""
    base = variant.removesuffix(COMPILED)
    tree = variant_tree(base)
    cfg = build_config({
        "model": {"preset": a.preset, "num_layers": a.layers},
        "data": {"source": "zarr", "path": os.path.join(run_dir, "none.pt"), "height": a.height, "width": a.width,
                 "num_frames": 1 + 4 * (a.latent_frames - 1)},
        "quant": tree["quant"],
        "train": {"output_dir": os.path.join(run_dir, variant), "max_steps": a.steps, "wandb_mode": "disabled",
                  "micro_batch": 1, "chunk_frames": 3, "precision": "bf16", "activation_checkpointing": True,
                  "warmup_steps": 5, "lr": a.lr, "compile_elementwise": "on" if variant != base else "off",
                  **tree["train"]}})
    model = build_variant_model(cfg, a.device)
    trainer = Trainer(cfg, dataset=random_latent_dataset(cfg, a.videos), device=torch.device(a.device), model=model,
                      progress=False)
    out = []
    for _ in range(a.steps):
        m = trainer.train_step()
        if m["loss"] != m["loss"]:
            raise FloatingPointError(f"{variant}: loss is NaN at step {len(out) + 1}")
        out.append(float(m["loss"]))
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def gaps(curve: list[float], ref: list[float], window: int) -> tuple[float, float]:
    """(max, last) over steps of the smoothed curves' relative gap |curve - ref| / ref."""
    c, r = smooth(curve, window), smooth(ref, window)
    rel = [abs(x - y) / abs(y) for x, y in zip(c, r)]
    return max(rel), rel[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--layers", type=int, default=4, help="blocks (the preset's shapes, fewer of them)")
    p.add_argument("--latent-frames", type=int, default=21)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--videos", type=int, default=4, help="size of the fixed random latent set")
    p.add_argument("--window", type=int, default=10, help="trailing mean over this many steps before comparing")
    p.add_argument("--quant", nargs="+", default=["bf16", "fp8_channel", "fp8_channel_fast"], choices=CHOICES)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (emulated FP8 GEMMs)")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    a = p.parse_args(argv)
    if a.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        print("bench_fp8_loss_track: needs a CUDA GPU with FP8 tensor cores (sm89+): the point is the real "
              "GEMMs and accumulators (the CPU tests cover the emulated ones; --device cpu: a smoke run)",
              file=sys.stderr)
        return 2
    curves = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for variant in a.quant:
            curves[variant] = losses(a, variant, run_dir)
            print(f"{variant:>18}: loss {curves[variant][0]:.4f} -> {curves[variant][-1]:.4f} "
                  f"(smoothed {smooth(curves[variant], a.window)[-1]:.4f})", flush=True)
    base = (f"{a.preset} {a.layers}-block loss track {a.latent_frames}x{a.height}x{a.width} {a.steps} steps "
            f"lr {a.lr:g}")
    for variant, c in curves.items():
        record(a.out, f"{base} {variant}", "loss series", round(c[-1], 5), "", losses=[round(v, 8) for v in c])
    pairs = [(v, "bf16") for v in curves if v != "bf16" and "bf16" in curves]
    if "fp8_channel_fast" in curves and "fp8_channel" in curves:
        pairs.append(("fp8_channel_fast", "fp8_channel"))
    eager = {v: v.removesuffix(COMPILED) for v in curves if v.endswith(COMPILED)}
    pairs += [(v, e) for v, e in eager.items() if e in curves and (v, e) not in pairs]    # a +compiled vs its eager self
    print(f"{'variant':>18} {'against':>12} {'gap max':>9} {'gap end':>9}   (smoothed over {a.window} steps)")
    for variant, ref in pairs:
        worst, end = gaps(curves[variant], curves[ref], a.window)
        print(f"{variant:>18} {ref:>12} {worst:9.4%} {end:9.4%}")
        record(a.out, f"{base} {variant} vs {ref}", "smoothed loss relative gap, max over steps", round(worst, 6), "",
               gap_at_end=round(end, 6), window=a.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
