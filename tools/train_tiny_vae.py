"""Train the shipped tiny Wan2.1 VAE (`WanVAE.tiny('wan2.1')` architecture) on synthetic moving-shape clips.

    python tools/train_tiny_vae.py [--steps 200] [--out megatron_longlive/assets/tiny_vae_wan21]

CPU only, deterministic (fixed seeds, fixed step count). Clips come from dataloaders/synthetic.py's
`render_video` (64x64, 1 + 4k frames); training uses random 32x32 crops of 5-frame clips (the VAE is fully
convolutional, so it transfers to 64x64) with L1 + MSE reconstruction of a posterior sample plus a small KL
term. Afterwards the per-channel mean / std of the posterior means over full 64x64 clips are written into the
config's `latents_mean` / `latents_std`, so `WanVAE.encode` yields roughly unit-variance latents. Output: a
diffusers-format directory (config.json + diffusion_pytorch_model.safetensors, ~0.9 MB) plus train_info.json.
These defaults (800 steps, ~6 min on 2 free cores) reach only ~13 dB held-out PSNR (random init ~9 dB); the
shipped asset needs >22 dB (tests/unit/test_tiny_vae_asset.py), which takes a GPU run on a pre-rendered pool:
    python tools/train_tiny_vae.py --device cuda --pool 8000 --workers 16 --batch 16 --steps 100000 --max-seconds 240
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from dataloaders.synthetic import render_video
from megatron_longlive.models.wan.vae import TINY_WAN21_ASSET, WanVAE

DATA_SEED = 1234          # training clips: render_video(DATA_SEED, i)
HELDOUT_SEED = 98765      # held-out clips for the PSNR check (also used by the unit test)


def clips(seed: int, indices, num_frames: int = 5, size: int = 64) -> torch.Tensor:
    """Synthetic clips [N, 3, T, size, size] in [-1, 1] of render_video(seed, i) for i in indices."""
    out = [torch.from_numpy(render_video(seed, i, size, size, num_frames, 1)[0]) for i in indices]
    return torch.stack(out).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return 10 * np.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """Encode + decode through the normalized-latent interface, clip by clip."""
    return torch.cat([vae.decode(vae.encode(v[None])) for v in video])


def _render_uint8(i: int) -> np.ndarray:
    return render_video(DATA_SEED, i, 64, 64, 5, 1)[0]                              # [5, 64, 64, 3] uint8


def clip_pool(size: int, workers: int) -> torch.Tensor:
    """`size` training clips rendered once (uint8 [N, 5, 64, 64, 3]); on a GPU rendering per step is the bottleneck."""
    if workers <= 1:
        arrays = [_render_uint8(i) for i in tqdm(range(size), desc="render clips")]
    else:
        from multiprocessing import Pool
        with Pool(workers) as pool:
            arrays = list(tqdm(pool.imap(_render_uint8, range(size), chunksize=64), total=size, desc="render clips"))
    return torch.from_numpy(np.stack(arrays))


def _lr_factor(progress: float, warmup: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to 0 (progress in [0, 1])."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train(steps: int, batch: int, crop: int, lr: float, kl_weight: float, seed: int,
          progress: bool = True, device: str = "cpu", pool: int = 0, workers: int = 1,
          max_seconds: float | None = None) -> tuple[WanVAE, list[float]]:
    """pool=0 renders fresh clips every step (the CPU default); pool=N samples batches from N pre-rendered clips.
    max_seconds ends training early; the learning-rate schedule follows max(step fraction, time fraction)."""
    torch.manual_seed(seed)
    vae = WanVAE.tiny("wan2.1", seed=seed)
    model = vae.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    rng = np.random.default_rng(seed)
    clip_bank = clip_pool(pool, workers) if pool else None
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train tiny VAE", disable=not progress)
    for step in bar:
        frac = step / steps
        if max_seconds:
            elapsed = time.perf_counter() - t0
            if elapsed >= max_seconds:
                break
            frac = max(frac, elapsed / max_seconds)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(frac)
        if clip_bank is None:
            full = clips(DATA_SEED, range(step * batch, (step + 1) * batch))       # [B, 3, 5, 64, 64]
        else:
            idx = torch.from_numpy(rng.integers(0, len(clip_bank), size=batch))
            full = clip_bank[idx].permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        y0, x0 = rng.integers(0, 64 - crop + 1, size=2)
        x = full[..., y0:y0 + crop, x0:x0 + crop].to(device)                       # [B, 3, 5, crop, crop]
        post = model.encode(x).latent_dist
        recon = model.decode(post.sample()).sample
        kl = 0.5 * torch.mean(post.mean ** 2 + post.var - 1 - post.logvar)
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or clip_bank is None:
            losses.append(loss.item())
    return WanVAE(model.to("cpu").eval(), "wan2.1"), losses


@torch.no_grad()
def latent_stats(vae: WanVAE, video: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of the raw posterior means over `video` [N, 3, T, H, W]."""
    mu = torch.cat([vae.model.encode(v[None]).latent_dist.mean for v in video])   # [N, 16, t, h, w]
    mu = mu.transpose(0, 1).flatten(1).double()
    return [round(v, 5) for v in mu.mean(1).tolist()], [round(max(v, 1e-3), 5) for v in mu.std(1).tolist()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=TINY_WAN21_ASSET)
    p.add_argument("--device", default="cpu", help="cpu | cuda (train there; the saved asset is fp32 either way)")
    p.add_argument("--pool", type=int, default=0,
                   help="Pre-render this many training clips and sample batches from them (0 = fresh clips each step).")
    p.add_argument("--workers", type=int, default=1, help="Processes rendering the clip pool.")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="Stop training after this long; the learning rate anneals to 0 by then.")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    vae, losses = train(args.steps, args.batch, args.crop, args.lr, args.kl_weight, args.seed, device=args.device,
                        pool=args.pool, workers=args.workers, max_seconds=args.max_seconds)
    stats_video = clips(DATA_SEED, range(10_000, 10_004))
    mean, std = latent_stats(vae, stats_video)
    vae.model.register_to_config(latents_mean=mean, latents_std=std)
    held = clips(HELDOUT_SEED, range(3))
    trained_psnr = psnr(reconstruct(vae, held), held)
    random_psnr = psnr(reconstruct(WanVAE.tiny("wan2.1", seed=0), held), held)
    os.makedirs(args.out, exist_ok=True)
    vae.model.save_pretrained(args.out, safe_serialization=True)
    info = dict(vars(args), data_seed=DATA_SEED, heldout_seed=HELDOUT_SEED, loss_first=losses[0],
                loss_last=sum(losses[-10:]) / len(losses[-10:]), heldout_psnr_db=round(trained_psnr, 2),
                random_init_psnr_db=round(random_psnr, 2), train_seconds=round(time.perf_counter() - t0, 1))
    info.pop("out")
    with open(os.path.join(args.out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
