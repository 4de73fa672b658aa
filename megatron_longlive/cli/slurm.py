"""Render (and optionally submit) a Slurm job for `longlive train` from a run config.

Writes RUN_DIR/config.yaml (resolved), RUN_DIR/code_version.txt and RUN_DIR/job.sbatch. Cluster settings
live in the config's `launch:` section (nodes, gpus_per_node, time, partition, container_image, ...), and
may be overridden with --set launch.nodes=4 etc. Without --submit nothing is sent to Slurm.
"""
from __future__ import annotations

import shutil
import subprocess

from ..launch.slurm import prepare_run_dir
from .common import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run-dir", required=True, help="Directory for the job's config snapshot, logs, checkpoints.")
    parser.add_argument("--submit", action="store_true", help="Run `sbatch` on the rendered script.")


def run(args) -> int:
    cfg = config_from_args(args)
    path = prepare_run_dir(cfg, args.run_dir)
    print(f"wrote {path}")
    if args.submit:
        if shutil.which("sbatch") is None:
            raise ValueError("--submit: `sbatch` is not on PATH. Fix: run on a Slurm login node, or submit "
                             f"{path} yourself.")
        subprocess.run(["sbatch", path], check=True)
    return 0
