"""Few-step LoRA distillation by simplified DMD: `longlive distill --config run.yaml [--set k=v] [--resume]`."""
from __future__ import annotations

import argparse

from .common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="Continue from the newest complete checkpoint in "
                        "distill.output_dir/checkpoints (fresh start if none).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the tqdm progress bar.")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..training.dmd import build_distill

    cfg = config_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    distiller = build_distill(cfg, device, progress=not args.no_progress, resume=args.resume)
    rows = distiller.train(progress=not args.no_progress)
    last = rows[-1] if rows else {}
    print(f"distilled {distiller.step} generator steps (critic loss {last.get('critic_loss', float('nan')):.5f}); "
          f"generator LoRA {cfg.distill.output_dir}/step_{distiller.step:06d}/generator; "
          f"metrics {cfg.distill.output_dir}/metrics.jsonl")
    return 0
