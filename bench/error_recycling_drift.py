"""Error recycling vs plain teacher forcing on the tiny model: drift of long streaming rollouts (CPU, minutes).

Data: latent "videos" of smooth periodic patterns (16 channels, 8x8 latents) translating by a fixed integer
velocity per latent frame (wrap-around; --velocities: static or 1 px/frame, or all 9 in {-1, 0, 1}^2); the
text embedding names the velocity. The
true continuation of a clip is known exactly, so drift is measurable: for held-out patterns the engine is
given the ground-truth first chunk (committed clean, as video continuation) and generates the rest, chunk by
chunk through the KV cache (global sink + rolling window), far past the training clip length.

For each seed, two runs with the same data, steps and seed - train.error_recycling off / on - are compared:
  * latent MSE of generated vs true chunks, early (chunks 1-3), mid (4-15, inside the training length) and
    late (16+, past it);
  * drift of late-chunk statistics from the data's: |std(generated) - std(data)| and |mean| per chunk.
Prints a table and appends rows to --out (JSON lines, bench/record.py format).

  nice -n 10 python bench/error_recycling_drift.py --steps 300 --seeds 0 1 --out bench/results.jsonl
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from dataloaders.latent_dataset import InMemoryLatentDataset  # noqa: E402
from megatron_longlive.config import InferConfig, build_config  # noqa: E402
from megatron_longlive.inference.engine import StreamingEngine  # noqa: E402
from megatron_longlive.training.trainer import Trainer  # noqa: E402

C, HW = 16, 8
VELOCITY_SETS = {"all": [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], "two": [(0, 0), (0, 1)]}
VELOCITIES = VELOCITY_SETS["two"]


def moving_patterns(num: int, frames: int, text_len: int, text_dim: int, seed: int):
    """latents [N, C, F, 8, 8] (unit std), text [N, L, D] (velocity class embedding), velocity class [N]."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.Generator().manual_seed(1234)                # class embeddings shared by train and test
    class_text = torch.randn(len(VELOCITIES), text_len, text_dim, generator=classes)
    yy, xx = torch.meshgrid(torch.arange(HW), torch.arange(HW), indexing="ij")
    lat, cls = [], torch.randint(len(VELOCITIES), (num,), generator=g)
    for n in range(num):
        base = torch.zeros(C, HW, HW)
        for _ in range(3):                                       # three periodic waves per channel
            ky, kx = torch.randint(0, 3, (2, C), generator=g)
            phase = 2 * math.pi * torch.rand(C, generator=g)
            amp = torch.randn(C, generator=g)
            base += amp[:, None, None] * torch.cos(2 * math.pi * (ky[:, None, None] * yy + kx[:, None, None] * xx) / HW
                                                   + phase[:, None, None])
        base = (base - base.mean()) / base.std()
        dy, dx = VELOCITIES[int(cls[n])]
        lat.append(torch.stack([torch.roll(base, (t * dy, t * dx), dims=(1, 2)) for t in range(frames)], dim=1))
    return torch.stack(lat), class_text[cls], cls


def train(arm: str, steps: int, seed: int, data, out_dir: str, lr: float):
    latents, text = data
    train_cfg = {"output_dir": out_dir, "max_steps": steps, "lr": lr, "warmup_steps": 20, "micro_batch": 4,
                 "chunk_frames": 1, "seed": seed, "save_interval": 10 ** 9, "wandb_mode": "disabled",
                 "error_recycling": arm == "on"}
    cfg = build_config({"train": train_cfg, "data": {"source": "zarr", "path": "unused.pt", "height": 64, "width": 64,
                                                     "num_frames": 1 + 4 * (latents.shape[2] - 1), "seed": seed}})
    trainer = Trainer(cfg, dataset=InMemoryLatentDataset(latents, text, name="<moving patterns>"), device="cpu",
                      progress=True)
    losses = trainer.train()
    return trainer.model.eval(), sum(losses[-20:]) / 20, trainer.recycler


@torch.no_grad()
def rollout(model, gt: torch.Tensor, text: torch.Tensor, steps: list[int], window: int, seed: int) -> torch.Tensor:
    """Engine continuation of gt [B, C, R, H, W] from its true first chunk: generated latents [B, C, R, H, W]."""
    b, _, r, h, w = gt.shape
    infer = InferConfig(chunk_frames=1, sink_frames=1, window_frames=window, denoising_steps=steps, num_chunks=r)
    engine = StreamingEngine(model, infer, (h, w), batch=b)
    engine.set_prompt(text)
    engine.commit(gt[:, :, :1])
    gen = torch.Generator().manual_seed(seed)
    out = [gt[:, :, :1]]
    for _ in range(1, r):
        out.append(engine.generate_chunk(torch.randn(b, C, 1, h, w, generator=gen)))
    return torch.cat(out, dim=2)


def drift_metrics(gen: torch.Tensor, gt: torch.Tensor, train_frames: int) -> dict:
    mse = (gen - gt).pow(2).mean(dim=(0, 1, 3, 4))                        # [R] per chunk
    std = gen.std(dim=(1, 3, 4)).mean(0)                                  # [R] per chunk, averaged over videos
    mean = gen.mean(dim=(1, 3, 4)).abs().mean(0)
    late = slice(train_frames, None)
    return {"mse_early": mse[1:4].mean().item(), "mse_mid": mse[4:train_frames].mean().item(),
            "mse_late": mse[late].mean().item(), "mse_last": mse[-1].item(),
            "std_dev_late": (std[late] - 1.0).abs().mean().item(), "abs_mean_late": mean[late].mean().item(),
            "mse_curve": [round(v, 4) for v in mse.tolist()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-videos", type=int, default=256)
    p.add_argument("--train-frames", type=int, default=8, help="latent frames per training clip (= chunks)")
    p.add_argument("--rollout", type=int, default=24, help="chunks per rollout (>= 16)")
    p.add_argument("--window", type=int, default=8, help="engine window in chunks, sink included")
    p.add_argument("--test-videos", type=int, default=16)
    p.add_argument("--denoising-steps", type=int, nargs="+", default=[1000, 875, 750, 625, 500, 375, 250, 125])
    p.add_argument("--velocities", choices=sorted(VELOCITY_SETS), default="two",
                   help="two: static or 1 px/frame to the right; all: the 9 velocities in {-1, 0, 1}^2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global VELOCITIES
    VELOCITIES = VELOCITY_SETS[args.velocities]
    cfg = build_config({}).model
    rows = []
    for seed in args.seeds:
        lat, text, _ = moving_patterns(args.train_videos, args.train_frames, cfg.text_len, cfg.text_dim, seed)
        gt, gt_text, _ = moving_patterns(args.test_videos, args.rollout, cfg.text_len, cfg.text_dim, 10_000 + seed)
        for arm in ("off", "on"):
            with tempfile.TemporaryDirectory() as tmp:
                model, final_loss, rec = train(arm, args.steps, seed, (lat, text), tmp, args.lr)
            m = drift_metrics(rollout(model, gt, gt_text, args.denoising_steps, args.window, seed), gt,
                              args.train_frames)
            m.update(seed=seed, arm=arm, final_loss=final_loss,
                     buffer=rec.stats() if rec is not None else None)
            rows.append(m)
    print(f"\n{'seed':>4} {'recycling':>9} {'loss':>7} {'mse 1-3':>8} {'mse 4-' + str(args.train_frames - 1):>8} "
          f"{'mse ' + str(args.train_frames) + '+':>8} {'mse last':>8} {'|std-1|':>8} {'|mean|':>8}")
    for m in rows:
        print(f"{m['seed']:>4} {m['arm']:>9} {m['final_loss']:7.4f} {m['mse_early']:8.4f} {m['mse_mid']:8.4f} "
              f"{m['mse_late']:8.4f} {m['mse_last']:8.4f} {m['std_dev_late']:8.4f} {m['abs_mean_late']:8.4f}")
    for arm in ("off", "on"):
        sel = [m for m in rows if m["arm"] == arm]
        for key in ("mse_early", "mse_mid", "mse_late", "std_dev_late"):
            value = sum(m[key] for m in sel) / len(sel)
            record(args.out or None, f"tiny tf error_recycling={arm} moving-pattern rollout {args.rollout} chunks "
                   f"(train {args.train_frames} frames, {args.steps} steps, seeds {args.seeds})", key, value, "latent",
                   curves=[m["mse_curve"] for m in sel], final_loss=[m["final_loss"] for m in sel])
    return 0


if __name__ == "__main__":
    sys.exit(main())
