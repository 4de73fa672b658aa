"""Shared harness of the SP/TP/DP equivalence tests: a tiny 4-head Wan DiT, seeded batches, an
independent single-process teacher-forcing reference, and the per-rank training worker."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from megatron_longlive.config import preset_config
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.models.wan.rope import grid_positions
from megatron_longlive.training.schedule import sample_sigmas
from megatron_longlive.training.teacher_forcing import teacher_forcing_mask

CFG = preset_config("tiny", num_heads=4, dim=96)   # 4 heads so that SP=4 and TP x SP = 4 fit
NUM_CHUNKS, CHUNK_FRAMES, H, W = 4, 2, 8, 8
TOKENS_PER_FRAME = (H // 2) * (W // 2)
LR, MOMENTUM = 0.05, 0.9


def make_model(provider=None) -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(CFG, provider)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # a zero head would hide bugs
    return model


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def noise_seed(step: int, sample: int) -> int:
    return 7919 * step + sample


def batch(step: int, sample: int = 0):
    """(latents [1, C, F, H, W], text [1, L, text_dim], sigmas [1, num_chunks]) of one video."""
    g = torch.Generator().manual_seed(1000 + 31 * step + sample)
    latents = torch.randn(1, CFG.in_channels, NUM_CHUNKS * CHUNK_FRAMES, H, W, generator=g)
    context = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g)
    return latents, context, sample_sigmas((1, NUM_CHUNKS), generator=g)


def reference_loss(model, step: int, sample: int = 0) -> torch.Tensor:
    """SP=1 teacher forcing written out directly: [clean | noisy] sequence, TF mask, MSE in latent space."""
    from megatron_longlive.distributed.sp_teacher_forcing import frame_noise

    latents, context, sigmas = batch(step, sample)
    f = NUM_CHUNKS * CHUNK_FRAMES
    eps = frame_noise(noise_seed(step, sample), 1, CFG.in_channels, range(f), H, W)
    s = sigmas.repeat_interleave(CHUNK_FRAMES, dim=1)                 # [1, F]
    z = (1 - s[:, None, :, None, None]) * latents + s[:, None, :, None, None] * eps
    clean, grid = model.patchify(latents)
    noisy, _ = model.patchify(z)
    pos = grid_positions(*grid)
    pred = model.forward_tokens(torch.cat([clean, noisy], 1), torch.cat([torch.zeros_like(s), 1000 * s], 1),
                                model.embed_context(context), torch.cat([pos, pos]),
                                teacher_forcing_mask(NUM_CHUNKS, CHUNK_FRAMES, TOKENS_PER_FRAME))
    velocity = model.unpatchify(pred[:, f * TOKENS_PER_FRAME:], grid)
    return (velocity - (eps - latents)).pow(2).mean()


def reference_run(steps: int, dp_size: int = 1):
    """Single process: per step (loss, grads) averaged over `dp_size` videos, and the final params."""
    model = make_model()
    opt = make_optimizer(model)
    out = []
    for step in range(steps):
        loss = sum(reference_loss(model, step, d) for d in range(dp_size)) / dp_size
        opt.zero_grad()
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def setup_rank(tp: int, sp: int, kind: str = "balanced", seed_model: bool = True, provider=None, quant=None):
    """Grid, the reference weights loaded into a (TP) model with the SP plan applied, and the layout.
    provider: the linear provider of a TP=1 model (default: plain linears); quant: a QuantConfig whose sharded
    linears a TP model gets (TPQuantProvider) instead of megatron-core's."""
    from megatron_longlive.distributed.balanced_sp import TFLayout
    from megatron_longlive.distributed.grid import init_grid
    from megatron_longlive.distributed.sp_plan import apply_sp_plan
    from megatron_longlive.distributed.tensor_parallel import TPLinearProvider, load_full_state_dict
    from megatron_longlive.models.wan.sp_plan import WAN_SP_PLAN

    groups = init_grid(tp, sp, CFG.num_heads)
    if tp > 1:
        from megatron_longlive.distributed.tensor_parallel import TPQuantProvider

        provider = TPQuantProvider(quant, groups.tp, tp) if quant is not None else TPLinearProvider(groups.tp, tp)
    model = make_model(provider)
    if seed_model:
        load_full_state_dict(model, make_model().state_dict(), groups.tp_rank, tp)
    apply_sp_plan(model, WAN_SP_PLAN, groups.sp)
    return groups, model, TFLayout(NUM_CHUNKS, CHUNK_FRAMES, TOKENS_PER_FRAME, sp, kind)


def train_steps(model, opt, groups, layout, steps, collect_grads: bool = False) -> list:
    """Run optimizer steps `steps` (a range: data and noise follow the step index); per step (loss, grads|None)."""
    from megatron_longlive.distributed.data_parallel import allreduce_gradients, reduce_loss
    from megatron_longlive.distributed.sp_teacher_forcing import frame_noise, local_tf_loss, needed_frames
    from megatron_longlive.distributed.tensor_parallel import full_state_dict

    frames = needed_frames(layout, groups.sp_rank)
    out = []
    for step in steps:
        latents, context, sigmas = batch(step, groups.dp_rank)
        noise = frame_noise(noise_seed(step, groups.dp_rank), 1, CFG.in_channels, frames, H, W)
        loss = local_tf_loss(model, layout, groups.sp_rank, latents[:, :, frames.start:frames.stop], noise,
                             sigmas, context)
        opt.zero_grad()
        loss.backward()
        allreduce_gradients(model, groups)
        grads = full_state_dict(model, groups.tp, grads=True) if collect_grads else None
        out.append((reduce_loss(loss, groups).item(), grads))
        opt.step()
    return out


def parallel_worker(rank: int, world: int, tp: int, sp: int, kind: str, steps: int):
    """One rank of a TP x SP x DP run of the same training; returns (per-step (loss, full grads), full params)."""
    from megatron_longlive.distributed.tensor_parallel import full_state_dict

    groups, model, layout = setup_rank(tp, sp, kind)
    out = train_steps(model, make_optimizer(model), groups, layout, range(steps), collect_grads=True)
    return out, full_state_dict(model, groups.tp)


def assert_same(actual: dict, expected: dict, what: str, rtol: float = 1e-5) -> None:
    """Per tensor: |a - e| <= rtol * |e| + rtol * max|e| (float32 summation order differs across layouts)."""
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        torch.testing.assert_close(actual[name], e, rtol=rtol, atol=rtol * float(e.abs().max()),
                                   msg=lambda m: f"{what} {name}: {m}")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_longlive_train(out_dir: str, nproc: int, *overrides: str) -> list[dict]:
    """`torchrun -m megatron_longlive.cli.main train` on the tiny config for 2 steps (+ `--set` overrides)."""
    from megatron_longlive.distributed.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "megatron_longlive.cli.main", "train", "-c",
           os.path.join(ROOT, "examples", "configs", "tiny.yaml"), "--no-progress"]
    for item in ("train.max_steps=2", f"train.output_dir={out_dir}", "train.save_interval=2",
                 "train.wandb_mode=disabled", "data.num_videos=4", *overrides):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 2") == 1  # only rank 0 reports
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
