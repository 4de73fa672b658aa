"""Teacher-forcing AR training of a Wan DiT: `longlive train --config run.yaml [--set k=v] [--resume]`."""
from __future__ import annotations

import argparse

from .common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest complete checkpoint in train.output_dir (fresh start if none).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the tqdm progress bar.")


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import Trainer

    cfg = config_from_args(args)
    parallel = {"device": args.device}
    if _multi_rank(cfg):  # launched by torchrun / srun / mpirun, or SP/TP > 1: grid, SP strategy, hooks
        from ..distributed.strategy import build_parallel_training

        parallel = build_parallel_training(cfg, args.device)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress, **parallel)
    losses = trainer.train()
    final = f"{losses[-1]:.5f}" if losses else "n/a"
    if trainer.hooks.is_logger:
        print(f"trained to step {trainer.step} (final loss {final}); checkpoint {trainer.last_checkpoint}; "
              f"metrics {cfg.train.output_dir}/metrics.jsonl")
    if "hooks" in parallel:
        from ..distributed.grid import destroy_grid

        destroy_grid()
    return 0


def _multi_rank(cfg) -> bool:
    from ..distributed.grid import discover_launch

    return cfg.parallel.sp_size > 1 or cfg.parallel.tp_size > 1 or discover_launch().launcher != "single"
