"""Checkpoints: DCP round trip, bit-identical resume, kill -9 and SIGTERM, atomic writes, pruning."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from dataloaders.latent_dataset import random_latent_dataset, save_latent_file
from megatron_longlive.config import build_config
from process_helpers import kill_after_first_checkpoint
from megatron_longlive.training import checkpoint as ckpt_mod
from megatron_longlive.training.checkpoint import COMPLETE, CheckpointManager
from megatron_longlive.training.metrics import read_metrics
from megatron_longlive.training.trainer import TeacherForcingStep, Trainer
pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread, as in the subprocesses


def tree(run_dir, **train):
    base = {"output_dir": str(run_dir), "max_steps": 6, "save_interval": 1000, "wandb_mode": "disabled",
            "warmup_steps": 2, "lr": 5e-3, "micro_batch": 1, "chunk_frames": 1, "seed": 0}
    return {"train": {**base, **train}, "data": {"source": "zarr", "path": str(run_dir) + "/latents.pt",
                                                 "height": 64, "width": 64, "num_frames": 9}}


def make(run_dir, resume=False, quant=None, **train):
    cfg = build_config({**tree(run_dir, **train), **({"quant": quant} if quant else {})})
    return Trainer(cfg, dataset=random_latent_dataset(cfg, 3), resume=resume, progress=False)


FP8_CHANNEL = {"linear": "fp8", "fp8_recipe": "channel_delayed", "fp8_amax_history": 4}   # delayed scales: state


@pytest.mark.parametrize("extra", [dict(ema_decay=0.9, grad_accum=2), dict(lora_rank=2, ema_decay=0.5),
                                   dict(quant=FP8_CHANNEL, grad_accum=2)],
                         ids=["full+ema+accum", "lora+ema", "fp8-channel+accum"])
def test_resume_is_bit_identical(tmp_path, extra):
    ref = make(tmp_path / "ref", **extra)
    ref_losses = ref.train()
    part = make(tmp_path / "run", **extra)
    first = [part.train_step()["loss"] for _ in range(3)]
    part.save_checkpoint()
    # a fresh process-like start: new trainer, same config, resume from `latest`
    resumed = make(tmp_path / "run", resume=True, **extra)
    assert resumed.step == 3
    rest = resumed.train()
    assert first + rest == ref_losses  # exact float equality, every step
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for k in (ref.ema.shadow if ref.ema else ()):
        assert torch.equal(ref.ema.shadow[k], resumed.ema.shadow[k]), k


def test_round_trip_restores_optimizer_rng_and_loader(tmp_path):
    a = make(tmp_path, ema_decay=0.9)
    a.train_step()
    a.train_step()
    a.save_checkpoint()
    expect_rand = (torch.rand(3), torch.rand(3, generator=a.generator))
    b = make(tmp_path, resume=True, ema_decay=0.9)
    assert (torch.equal(torch.rand(3), expect_rand[0]) and
            torch.equal(torch.rand(3, generator=b.generator), expect_rand[1]))
    assert b.loader.state_dict() == a.loader.state_dict() and b.step == 2
    assert b.scheduler.state_dict()["last_epoch"] == 2
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    files = os.listdir(a.last_checkpoint)
    assert ".metadata" in files and COMPLETE in files and "trainer_rank0.pt" in files


def test_interrupted_write_is_never_picked_up(tmp_path, monkeypatch):
    t = make(tmp_path, save_interval=2)
    t.train_step()
    t.train_step()
    good = t.save_checkpoint()
    t.train_step()

    def crash(path):
        raise RuntimeError("simulated crash before the rename")

    monkeypatch.setattr(ckpt_mod, "_fsync_tree", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.save_checkpoint()
    monkeypatch.undo()
    root = os.path.join(tmp_path, "checkpoints")
    leftovers = [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert leftovers and os.path.exists(os.path.join(root, leftovers[0], ".metadata"))
    # a renamed-but-unmarked dir (e.g. a foreign copy) and a pointer naming it are ignored too
    shutil.copytree(good, os.path.join(root, "step_00000099"))
    os.remove(os.path.join(root, "step_00000099", COMPLETE))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000099\n")
    assert CheckpointManager(str(tmp_path)).latest() == good
    resumed = make(tmp_path, resume=True, save_interval=2)
    assert resumed.step == 2
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        resumed.ckpt.load(os.path.join(root, "step_00000099"), resumed.model, resumed.optimizer, None)
    resumed.train_step()
    resumed.save_checkpoint()  # the next save clears crashed temp dirs
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert open(os.path.join(root, "latest")).read().strip() == "step_00000003"


def test_keep_last_n(tmp_path):
    t = make(tmp_path, save_interval=1, keep_last=2, max_steps=5)
    t.train()
    assert CheckpointManager(str(tmp_path)).complete_steps() == [4, 5]


def test_sigterm_saves_and_stops(tmp_path):
    class SignalAtStep(TeacherForcingStep):
        calls = 0

        def __call__(self, model, batch, generator):
            SignalAtStep.calls += 1
            if SignalAtStep.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # delivered to the trainer's handler
            return super().__call__(model, batch, generator)

    cfg = build_config(tree(tmp_path, max_steps=6))
    t = Trainer(cfg, dataset=random_latent_dataset(cfg, 3), strategy=SignalAtStep(1), progress=False)
    losses = t.train()
    assert len(losses) == 3 and t.step == 3
    assert CheckpointManager(str(tmp_path)).latest().endswith("step_00000003")
    assert signal.getsignal(signal.SIGTERM) is not t._on_sigterm  # handler restored


def _train_cmd(config_path, *extra):
    return [sys.executable, "-m", "megatron_longlive.cli.main", "train", "--config", str(config_path),
            "--no-progress", *extra]


def test_kill9_then_resume_gives_identical_losses(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cfg = build_config(tree(tmp_path, max_steps=14, save_interval=2))
    ds = random_latent_dataset(cfg, 3)
    save_latent_file(tmp_path / "latents.pt", ds.latents, ds.text, ds.captions)
    paths = {}
    for name in ("ref", "run"):
        t = tree(tmp_path / name, max_steps=14, save_interval=2)
        t["data"]["path"] = str(tmp_path / "latents.pt")
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(t))
    # the uninterrupted reference runs in this process (one thread, like the subprocesses)
    from megatron_longlive.config import load_config

    ref = Trainer(load_config(str(paths["ref"])), progress=False).train()
    assert len(ref) == 14

    proc = subprocess.Popen(_train_cmd(paths["run"]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_first_checkpoint(proc, tmp_path / "run" / "checkpoints" / "latest", timeout=120)
    killed_at = len(read_metrics(str(tmp_path / "run" / "metrics.jsonl")))
    assert killed_at < 14

    out = subprocess.run(_train_cmd(paths["run"], "--resume"), env=env, check=True, capture_output=True, text=True)
    resumed_step = int((out.stdout + out.stderr).split("resumed from ")[1].split("at step ")[1].split()[0])
    assert 2 <= resumed_step < 14
    got = [r["loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))]
    assert [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == list(range(1, 15))
    assert got == ref
