"""The CPU quickstart: synthetic shapes data -> train the tiny model -> distill a 2-step LoRA -> stream an mp4."""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

from .common import add_config_arguments

# The embedded demo setting on top of the tiny defaults (user --set overrides come after these).
DEMO_OVERRIDES = [
    "data.num_videos=16", "data.num_shots=1", "data.num_frames=13",
    "train.max_steps=300", "train.lr=1e-3", "train.warmup_steps=20", "train.save_interval=100",
    "train.log_interval=10", "train.wandb_mode=disabled",
    "infer.num_chunks=10", "infer.chunk_frames=1", "infer.window_frames=4", "infer.sink_frames=1",
    "infer.shot_sink_frames=1",   # the second prompt starts a new shot: its first chunk anchors the shot
    # few-step LoRA by simplified DMD: a short run, 2-step sampling afterwards
    "distill.max_steps=20", "distill.critic_ratio=2", "distill.rollout_frames=4", "distill.rank=8",
    "distill.critic_rank=8", "distill.denoising_steps=[1000,500]",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out-dir", default="demo_out", help="Where data, the run and the video go.")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT[@CHUNK]",
                        help="Prompts for the video (default: two captions of the synthetic data, switching halfway).")
    parser.add_argument("--skip-train", action="store_true", help="Generate from the untrained (random) model.")
    parser.add_argument("--skip-distill", action="store_true",
                        help="Sample the trained model with infer.denoising_steps instead of the distilled 2-step LoRA.")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..inference.pipeline import generate_video, load_dit, load_encoders
    from ..inference.prompts import parse_cli_prompts
    from ..training.trainer import Trainer
    from dataloaders.synthetic import build_dataset

    t0 = time.perf_counter()
    out = os.path.abspath(args.out_dir)
    run_dir = os.path.join(out, "run")
    overrides = DEMO_OVERRIDES + [f"train.output_dir={run_dir}", f"data.path={os.path.join(out, 'data')}",
                                  f"distill.teacher={run_dir}", f"distill.output_dir={os.path.join(out, 'distill')}",
                                  f"infer.output={os.path.join(out, 'video.mp4')}"] + args.overrides
    cfg = load_config(args.config, overrides)
    progress = not args.no_progress
    # 1. synthetic data: mp4 files + manifest, encoded to latents with the tiny VAE and text encoder
    print(f"[1/4] synthetic data -> {cfg.data.path}")
    dataset = build_dataset(cfg, progress=progress)
    # 2. teacher-forcing training of the tiny model
    if args.skip_train:
        print("[2/4] training skipped (--skip-train): generating from the randomly initialised model")
        checkpoint = None
    else:
        print(f"[2/4] training {cfg.train.max_steps} steps -> {run_dir}")
        trainer = Trainer(cfg, dataset=dataset, device="cpu", progress=progress)
        losses = trainer.train()
        if trainer.step < cfg.train.max_steps:
            print(f"training stopped at step {trainer.step} (checkpoint {trainer.last_checkpoint}); no video generated. "
                  f"Rerun the same command to start over.")
            return 1
        print(f"      loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoint {trainer.last_checkpoint}")
        checkpoint = run_dir
    # 3. streaming generation: two shots, the prompt switches (with a scene cut) halfway
    if args.prompt:
        segments = parse_cli_prompts(args.prompt)
    else:
        first, second = dataset.captions[0], next((c for c in dataset.captions if c != dataset.captions[0]),
                                                  dataset.captions[0])
        segments = parse_cli_prompts([f"{first}@0", f"{second}@{cfg.infer.num_chunks // 2}"])
        segments[1] = dataclasses.replace(segments[1], new_shot=True)   # two shots: a scene cut halfway
    shot = 0
    for s in segments:
        shot += s.new_shot or s.start_chunk == 0
        print(f"      chunk {s.start_chunk:>3}: shot {shot}: {s.prompt}")
    # 3. few-step LoRA distilled by simplified DMD on the frozen trained model (only the LoRA trains)
    adapter = None
    if checkpoint and not args.skip_distill:
        from ..training.dmd import build_distill

        print(f"[3/4] distilling a {len(cfg.distill.denoising_steps)}-step LoRA ({cfg.distill.max_steps} DMD steps) "
              f"-> {cfg.distill.output_dir}")
        distiller = build_distill(cfg, "cpu", progress=progress)
        distiller.train(progress=progress)
        adapter = os.path.join(cfg.distill.output_dir, f"step_{distiller.step:06d}", "generator")
        cfg.infer.denoising_steps = list(cfg.distill.denoising_steps)
    else:
        print("[3/4] distillation skipped: sampling with infer.denoising_steps")
    vae, text_encoder = load_encoders(cfg)
    model = load_dit(cfg, checkpoint)
    if adapter:
        from ..training.lora_switch import load_with_adapter

        load_with_adapter(model, adapter, merge=True)
    print(f"[4/4] generating {cfg.infer.num_chunks} chunks with {len(cfg.infer.denoising_steps)} denoising steps each")
    result = generate_video(cfg, model, segments, cfg.infer.output, vae, text_encoder,
                            latents_path=os.path.join(out, "latents.pt"), progress=progress)
    frames = result.video.shape[2]
    print(f"video: {result.video_path} ({frames} frames, {frames / cfg.infer.fps:.1f} s); "
          f"demo took {time.perf_counter() - t0:.0f} s")
    return 0
