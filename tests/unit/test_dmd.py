"""Simplified DMD: rollout through the KV cache, the DMD2 surrogate, LoRA-only updates, and the CLI end to end."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_longlive.cli.main import main
from megatron_longlive.config import build_config
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.models.wan.convert import save_wan_weights
from megatron_longlive.training import dmd
from megatron_longlive.training.lora_switch import adapter_parameters, load_named_adapter, use_adapter

pytestmark = pytest.mark.usefixtures("one_thread")




def _cfg(tmp_path, **distill):
    base = {"rollout_frames": 4, "critic_ratio": 2, "real_guidance": 3.0, "rank": 4, "critic_rank": 4, "max_steps": 2,
            "output_dir": str(tmp_path / "distill"), "lr": 1e-2, "critic_lr": 1e-2, "save_interval": 2}
    return build_config({"train": {"chunk_frames": 2, "output_dir": str(tmp_path / "run"), "wandb_mode": "disabled"},
                         "data": {"height": 32, "width": 32, "num_frames": 13, "num_videos": 2},
                         "distill": {**base, **distill}})


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = WanDiT(cfg.model)
    m.init_weights()
    torch.nn.init.normal_(m.head.head.weight, std=0.05)
    return m


def _prompts(cfg, n=3):
    return torch.randn(n, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_only_lora_trains_and_base_is_bitwise_unchanged(tmp_path, mode):
    cfg = _cfg(tmp_path)
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = dmd.Distiller(cfg, model, _prompts(cfg), mode, (4, 4))
    gen0 = [p.detach().clone() for p in d.gen_params]
    # one generator step: gradients reach generator adapters only (critic adapters and base: none)
    d.gen_opt.zero_grad(set_to_none=True)
    d.critic_opt.zero_grad(set_to_none=True)
    d.generator_step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A.generator." in n or ".lora_B.generator." in n for n in with_grad)
    assert any(".lora_B.generator." in n and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.grad is not None)
    # one critic step: critic adapters only
    for p in d.gen_params:
        p.grad = None
    d.critic_step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A.critic." in n or ".lora_B.critic." in n for n in with_grad)
    rows = d.train(progress=False)
    assert len(rows) == 2 and all(r["critic_loss"] == r["critic_loss"] for r in rows)
    assert any(not torch.equal(a, p) for a, p in zip(gen0, d.gen_params))
    after = model.state_dict()
    for k, v in before.items():   # wrapped linears keep their weights under .base_layer
        k2 = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[k2], v), k
    assert len(after) == len(before) + 4 * len(adapter_parameters(model, "generator")) // 2


def test_rollout_gradient_path_equals_engine_and_is_causal(tmp_path):
    """The differentiable last step (cache read, not written) gives the engine's own samples; chunk c does not
    depend on the noise of later chunks; gradients reach x only through each chunk's last step."""
    cfg = _cfg(tmp_path)
    model = _model(cfg)
    d = dmd.Distiller(cfg, model, _prompts(cfg), "causal", (4, 4))
    for p in adapter_parameters(model, "generator"):
        torch.nn.init.normal_(p, std=0.1)
    text = _prompts(cfg)[:1]
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with use_adapter(model, "generator"):
        a = dmd.rollout(d.engine, text, z, grad=True)
        b = dmd.rollout(d.engine, text, z, grad=False)
        z2 = z.clone()
        z2[:, :, 2:] = torch.randn(1, 16, 2, 4, 4)
        c = dmd.rollout(d.engine, text, z2, grad=False)
    assert a.requires_grad and not b.requires_grad
    assert (a - b).abs().max().item() < 1e-5
    assert torch.equal(b[:, :, :2], c[:, :, :2]) and not torch.allclose(b[:, :, 2:], c[:, :, 2:])
    # d x_chunk1 / d z_chunk0 is zero: the cache carries no gradient into later chunks
    zg = z.clone().requires_grad_(True)
    with use_adapter(model, "generator"):
        out = dmd.rollout(d.engine, text, zg, grad=True)
    out[:, :, 2:].sum().backward()
    assert zg.grad is None or zg.grad[:, :, :2].abs().max() == 0


def test_dmd_surrogate_gradient_is_normalised_score_difference(tmp_path):
    """d loss / d x = (x0_fake - x0_real) / mean|x - x0_real| / numel, with real = CFG of the bare base."""
    cfg = _cfg(tmp_path)
    model = _model(cfg)
    dmd.Distiller(cfg, model, _prompts(cfg), "bidirectional", (4, 4))
    for p in adapter_parameters(model, "critic"):
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 4, 4, 4, generator=g).requires_grad_(True)
    eps = torch.randn(1, 16, 4, 4, 4, generator=g)
    sigma = torch.tensor([0.7])
    text, null = _prompts(cfg)[:1], torch.zeros(1, cfg.model.text_len, cfg.model.text_dim)
    loss, _ = dmd.dmd_loss(model, x, text, null, sigma, eps, 3.0, "bidirectional", 2)
    loss.backward()
    with torch.no_grad():   # independent: float64 copy of the formula from plain forwards
        x_t = ((1 - sigma) * x + sigma * eps).double()
        with use_adapter(model, None):
            vc, vu = model(x_t.float(), sigma * 1000, text).double(), model(x_t.float(), sigma * 1000, null).double()
        with use_adapter(model, "critic"):
            vf = model(x_t.float(), sigma * 1000, text).double()
        real = x_t - sigma.double() * (vu + 3.0 * (vc - vu))
        fake = x_t - sigma.double() * vf
        expect = (fake - real) / (x.double() - real).abs().mean() / x.numel()
    assert torch.allclose(x.grad.double(), expect, rtol=1e-4, atol=1e-9)
    assert (fake - real).abs().max() > 1e-3


@pytest.mark.slow  # builds the synthetic dataset (VAE encode) and runs the CLI four times
def test_distill_cli_end_to_end_and_errors(tmp_path):
    cfg = _cfg(tmp_path)
    teacher = tmp_path / "teacher.safetensors"
    save_wan_weights(_model(cfg), str(teacher))
    common = ["--set", "train.chunk_frames=2", "--set", f"train.output_dir={tmp_path / 'run'}", "--set",
              "data.height=32", "--set", "data.width=32", "--set", "data.num_videos=2", "--set",
              "distill.rollout_frames=4", "--set", "distill.critic_ratio=1", "--set", "distill.rank=2", "--set",
              "distill.critic_rank=2", "--set", "distill.max_steps=1", "--set", "distill.save_interval=1", "--set",
              f"distill.output_dir={tmp_path / 'out'}", "--no-progress", "--device", "cpu"]
    assert main(["distill", *common, "--set", f"distill.teacher={teacher}"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(rows) == 1 and {"critic_loss", "generator_loss", "step_time"} <= set(rows[0])
    fresh = _model(cfg)
    assert len(load_named_adapter(fresh, "g", str(tmp_path / "out" / "step_000001" / "generator"))) == 20
    # bad input: missing checkpoint field, rollout not whole chunks, a teacher of another config
    assert main(["distill", *common]) == 2
    assert main(["distill", *common, "--set", f"distill.teacher={teacher}", "--set", "distill.rollout_frames=3"]) == 2
    other = build_config({"model": {"dim": 96}})
    save_wan_weights(_model(other), str(tmp_path / "wide.safetensors"))
    assert main(["distill", *common, "--set", f"distill.teacher={tmp_path / 'wide.safetensors'}"]) == 2


# ----- does the distilled LoRA help? (tiny model trained on the synthetic videos) ------------------------
# Measured (2026-11-25, CPU, 1 thread; recipe below): latent MSE to the 40-step teacher over 16 seeds:
#   2-step teacher, no LoRA                      0.011454
#   2-step, LoRA distilled directly (AR teacher)  0.010787   (-5.8 %)
#   2-step, LoRA distilled standalone (bidirectional base, applied to the AR model)  0.011264   (-1.7 %)
# (adapters initialised from distill.seed since the resume work; before, from the global RNG: 0.010958 / 0.011577)
# -> on the tiny model the direct initialisation transfers better than standalone injection.
MEASURED = {"baseline": 0.011454, "direct": 0.010787, "standalone": 0.011264}


def _recipe(run_dir: str, **distill):
    train = {"output_dir": run_dir, "max_steps": 80, "lr": 3e-3, "warmup_steps": 5, "save_interval": 100000,
             "wandb_mode": "disabled", "chunk_frames": 2, "micro_batch": 2}
    d = {"rollout_frames": 4, "critic_ratio": 2, "real_guidance": 1.0, "rank": 8, "critic_rank": 8, "max_steps": 30,
         "output_dir": run_dir + "/dist", "lr": 1e-2, "critic_lr": 1e-2, "denoising_steps": [1000, 500], **distill}
    return build_config({"data": {"height": 32, "width": 32, "num_frames": 13, "num_videos": 4}, "train": train,
                         "distill": d})


@pytest.mark.slow  # trains a bidirectional base, an AR teacher and two LoRAs (minutes on a loaded 2-core CPU)
def test_distilled_lora_brings_two_step_samples_closer_to_the_many_step_teacher(tmp_path):
    from dataloaders.latent_dataset import InMemoryLatentDataset, build_dataset
    from megatron_longlive.training.trainer import Trainer, build_model

    cfg = _recipe(str(tmp_path / "bi"))
    ds0 = build_dataset(cfg)
    latents = torch.stack([ds0[i]["latents"] for i in range(len(ds0))])
    # unconditional: the teacher must pick one of the videos from the noise alone (no CFG, real_guidance=1)
    ds = InMemoryLatentDataset(latents, torch.zeros(len(ds0), *ds0[0]["text"].shape))
    bi = Trainer(cfg, dataset=ds, strategy=dmd.BidirectionalStep(), progress=False)
    bi.train()
    base_sd = {k: v.clone() for k, v in bi.model.state_dict().items()}
    cfg_ar = _recipe(str(tmp_path / "ar"))
    ar_model = build_model(cfg_ar)
    ar_model.load_state_dict(base_sd)
    ar = Trainer(cfg_ar, dataset=ds, model=ar_model, progress=False)
    ar.train()
    teacher_sd = {k: v.clone() for k, v in ar.model.state_dict().items()}
    prompts = torch.stack([ds[i]["text"] for i in range(len(ds))])

    def fresh(sd):
        m = build_model(cfg_ar)
        m.load_state_dict(sd)
        return m.eval()

    seeds, many = list(range(16)), list(range(1000, 0, -25))
    ref = dmd.sample(fresh(teacher_sd), prompts, seeds, many, 2, 4, (4, 4))
    mse = {"baseline": (dmd.sample(fresh(teacher_sd), prompts, seeds, [1000, 500], 2, 4, (4, 4)) - ref).pow(2).mean()}
    for init, sd, mode in (("direct", teacher_sd, "causal"), ("standalone", base_sd, "bidirectional")):
        model = fresh(sd).train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        d = dmd.Distiller(_recipe(str(tmp_path / init)), model, prompts, mode, (4, 4))
        d.train(progress=False)
        after = model.state_dict()
        assert all(torch.equal(after[k if k in after else k.replace(".weight", ".base_layer.weight")
                                     .replace(".bias", ".base_layer.bias")], v) for k, v in before.items())
        d.save(str(tmp_path / init / "final"))
        student = fresh(teacher_sd)              # both LoRAs are applied to the AR model
        load_named_adapter(student, "g", str(tmp_path / init / "final" / "generator"))
        out = dmd.sample(student, prompts, seeds, [1000, 500], 2, 4, (4, 4), adapter="g")
        mse[init] = (out - ref).pow(2).mean()
    print("latent MSE to the 40-step teacher:", {k: round(v.item(), 6) for k, v in mse.items()})
    assert abs(mse["baseline"].item() - MEASURED["baseline"]) < 1e-3
    assert mse["direct"] < 0.985 * mse["baseline"]
    assert mse["direct"] < mse["standalone"]
