"""Turn a folder of videos into a resumable Zarr latent cache: `longlive preprocess VIDEOS --out CACHE`."""
from __future__ import annotations

import argparse

from .common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="Folder of videos (searched recursively).")
    parser.add_argument("--out", required=True, help="Cache root (a Zarr directory; created or resumed).")
    add_config_arguments(parser)
    parser.add_argument("--vae", default="tiny",
                        help="'tiny' (random, tests), or a local diffusers VAE directory / official Wan2.1_VAE.pth.")
    parser.add_argument("--text-encoder", default="tiny",
                        help="'tiny' (random umT5, model.text_dim/text_len), or a local umT5 directory.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny models.")
    parser.add_argument("--shard-index", type=int, default=0, help="This writer's shard (0-based).")
    parser.add_argument("--num-shards", type=int, default=1, help="Writers in total; each takes every n-th video.")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="Model dtype.")
    parser.add_argument("--report", default=None, help="Report JSON path (default: CACHE/_reports/<shard>.json).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the tqdm progress bar.")


def run(args: argparse.Namespace) -> int:
    import torch

    from dataloaders.preprocess import PreprocessOptions, preprocess
    from megatron_longlive.models.wan.text_encoder import TextEncoder
    from megatron_longlive.models.wan.vae import WanVAE

    cfg = config_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    vae = WanVAE.tiny(cfg.model.vae, seed=args.seed) if args.vae == "tiny" else WanVAE.from_pretrained(args.vae, dtype)
    if args.text_encoder == "tiny":
        text = TextEncoder.tiny(text_dim=cfg.model.text_dim, text_len=cfg.model.text_len, seed=args.seed)
    else:
        text = TextEncoder.from_pretrained(args.text_encoder, text_len=cfg.model.text_len, dtype=dtype)
    vae, text = vae.to(device, dtype), text.to(device, dtype)
    opts = PreprocessOptions.from_config(cfg.data, cfg.train.chunk_frames)
    report = preprocess(args.input, args.out, opts, vae, text, args.shard_index, args.num_shards, device=device,
                        report_path=args.report, progress=not args.no_progress)
    counts = ", ".join(f"{k}: {v}" for k, v in report["reason_counts"].items()) or "none"
    print(f"{report['num_videos']} video(s) committed from {report['num_sources']} source(s) to {args.out}; "
          f"rejections: {counts}")
    return 0
