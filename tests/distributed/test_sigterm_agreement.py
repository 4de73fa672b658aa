"""SIGTERM that reaches only one rank: every rank stops on the same step with one complete checkpoint (the stop
flag is agreed by an all-reduce each step), instead of one rank entering the collective checkpoint alone."""
from __future__ import annotations

import os

import pytest

from megatron_longlive.distributed.launch import spawn

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(rank, world, out_dir):
    import signal

    import torch

    from megatron_longlive.config import load_config
    from megatron_longlive.distributed.strategy import build_parallel_training
    from megatron_longlive.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(ROOT, "examples", "configs", "tiny.yaml"),
                      ["parallel.sp_size=2", "parallel.backend=gloo", f"train.output_dir={out_dir}",
                       "train.max_steps=6", "train.save_interval=100", "train.wandb_mode=disabled",
                       "data.num_videos=4", f"data.path={out_dir}/data"])
    trainer = Trainer(cfg, progress=False, **build_parallel_training(cfg))
    step = trainer.train_step

    def train_step():
        metrics = step()
        if rank == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)       # a real signal, delivered to this rank only
        return metrics

    trainer.train_step = train_step
    losses = trainer.train()
    return {"step": trainer.step, "losses": len(losses), "checkpoint": trainer.last_checkpoint}


def test_sigterm_on_one_rank_stops_every_rank_on_the_same_step(tmp_path):
    out = str(tmp_path / "run")
    results = spawn(_worker, 2, out, timeout=180)   # without the agreement the ranks hang in the checkpoint
    assert [r["step"] for r in results] == [2, 2] and [r["losses"] for r in results] == [2, 2]
    ckpt = results[0]["checkpoint"]
    assert ckpt == results[1]["checkpoint"] and ckpt.endswith("step_00000002")
    assert os.path.exists(os.path.join(ckpt, "COMPLETE"))
