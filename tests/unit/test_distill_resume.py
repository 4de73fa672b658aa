"""Resumable distillation (issue 11): `longlive distill` checkpoints both adapters, both optimizers, step and RNG
atomically (training/checkpoint.py), and `--resume` continues with exactly the losses of an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_longlive.cli.main import main
from megatron_longlive.config import build_config
from process_helpers import kill_after_first_checkpoint
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.models.wan.convert import save_wan_weights
from megatron_longlive.training import dmd
from megatron_longlive.training.checkpoint import CheckpointManager
from megatron_longlive.training.lora import read_adapter_files
from megatron_longlive.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = ("critic_loss", "generator_loss", "dmd_grad_norm", "gen_grad_norm")


def _cfg(out, max_steps, save_interval=2, **distill):
    return build_config({
        "train": {"chunk_frames": 2, "output_dir": str(out) + "_tf", "wandb_mode": "disabled"},
        "data": {"height": 32, "width": 32, "num_frames": 13, "num_videos": 2},
        "distill": {"rollout_frames": 4, "critic_ratio": 2, "rank": 4, "critic_rank": 4, "max_steps": max_steps,
                    "save_interval": save_interval, "output_dir": str(out), "lr": 1e-2, "critic_lr": 1e-2, **distill}})


def _distiller(cfg, resume=False):
    torch.manual_seed(0)
    model = WanDiT(cfg.model)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    prompts = torch.randn(3, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(4))
    d = dmd.Distiller(cfg, model, prompts, "causal", (4, 4))
    if resume:
        d.resume()
    return d


def _losses(out):
    return [(r["step"], *(r[k] for k in LOSSES)) for r in read_metrics(os.path.join(out, "metrics.jsonl"))]


def test_two_then_two_more_equals_four(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _distiller(_cfg(ref, 4)).train(progress=False)
    _distiller(_cfg(run, 2)).train(progress=False)
    # the checkpoint holds the adapters and optimizers only, not the frozen base
    ckpt = CheckpointManager(str(run)).latest()
    assert ckpt.endswith("step_00000002")
    keys = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert any(".lora_A.critic." in k for k in model_keys) and any("optim.state." in k for k in keys)
    d = _distiller(_cfg(run, 4), resume=True)
    assert d.step == 2
    d.train(progress=False)
    assert _losses(run) == _losses(ref)                               # exact, every logged number
    a = read_adapter_files(str(run / "step_000004" / "generator"))[1]
    b = read_adapter_files(str(ref / "step_000004" / "generator"))[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_rank(tmp_path):
    _distiller(_cfg(tmp_path / "run", 2)).train(progress=False)
    with pytest.raises(ValueError, match="step_00000002.*cannot load"):
        _distiller(_cfg(tmp_path / "run", 4, rank=8), resume=True)


def _cli(out, teacher, max_steps):
    return ["distill", "--set", "train.chunk_frames=2", "--set", f"train.output_dir={out}_tf", "--set",
            "train.wandb_mode=disabled", "--set", "data.height=32", "--set", "data.width=32", "--set",
            "data.num_videos=2", "--set", "distill.rollout_frames=4", "--set", "distill.critic_ratio=1", "--set",
            "distill.rank=2", "--set", "distill.critic_rank=2", "--set", f"distill.max_steps={max_steps}", "--set",
            "distill.save_interval=1", "--set", f"distill.output_dir={out}", "--set", f"distill.teacher={teacher}",
            "--no-progress", "--device", "cpu"]


@pytest.mark.slow  # three CLI runs, one a subprocess killed with SIGKILL (~50 s on a loaded 2-core CPU)
def test_kill9_then_resume_gives_identical_losses(tmp_path):
    cfg = _cfg(tmp_path / "x", 1)
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    model = WanDiT(cfg.model)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    save_wan_weights(model, str(teacher))
    run, ref = tmp_path / "run", tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_longlive.cli.main", *_cli(run, teacher, 1000)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_first_checkpoint(proc, run / "checkpoints" / "latest", timeout=300)
    resumed_from = CheckpointManager(str(run)).latest()
    step = int(resumed_from.rsplit("_", 1)[1])
    assert step >= 1 and len(_losses(run)) >= step
    # resume to two steps past the checkpoint; the reference runs those steps uninterrupted
    assert main([*_cli(run, teacher, step + 2), "--resume"]) == 0
    assert main(_cli(ref, teacher, step + 2)) == 0
    got, want = _losses(run), _losses(ref)
    assert [r[0] for r in got] == list(range(1, step + 3))
    assert got == want
