"""`longlive train` under torchrun: SP=2 on 2 gloo processes trains 2 steps with the same losses and
gradient norms as the same command at SP=1 (1 process), writes one metrics file and a DCP checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_longlive.distributed.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two torchrun launches: ~1 min on 2 busy cores


def _train(out_dir: str, nproc: int, sp: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "megatron_longlive.cli.main", "train", "-c",
           os.path.join(ROOT, "examples", "configs", "tiny.yaml"), "--set", f"parallel.sp_size={sp}",
           "--set", "train.max_steps=2", "--set", f"train.output_dir={out_dir}", "--set", "train.save_interval=2",
           "--set", "train.wandb_mode=disabled", "--set", "data.num_videos=4", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 2") == 1  # only rank 0 reports
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_longlive_train_sp2_matches_sp1(tmp_path):
    sp2 = _train(str(tmp_path / "sp2"), 2, 2)
    sp1 = _train(str(tmp_path / "sp1"), 1, 1)
    assert [m["step"] for m in sp2] == [1, 2]
    for a, b in zip(sp2, sp1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert os.path.exists(tmp_path / "sp2" / "checkpoints" / "step_00000002" / "COMPLETE")
    assert os.path.exists(tmp_path / "sp2" / "checkpoints" / "step_00000002" / "trainer_rank0.pt")
