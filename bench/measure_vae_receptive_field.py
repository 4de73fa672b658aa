"""Measure the causal Wan VAE encoder's temporal receptive field: the smallest left halo for exact chunked encoding.

For each VAE architecture (tiny and real configs, random weights: the receptive field is a property of the
architecture), encode a long random video once in full, then encode only the last chunk with a growing left halo
(megatron_longlive.models.wan.vae_halo) and record max |halo encode - full encode| over the chunk's latents.
Reports, per architecture and dtype, the smallest halo where the difference is <= --tol (float32 criterion of the
issues, 1e-5) and where it is exactly zero (the causal support). Prints a table and appends JSON lines to --out.

  python bench/measure_vae_receptive_field.py --out bench/results.jsonl                    # all four configs, fp32
  python bench/measure_vae_receptive_field.py --kinds wan2.1 --configs real --dtypes float64
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from megatron_longlive.models.wan.vae import WanVAE  # noqa: E402
from megatron_longlive.models.wan.vae_halo import architecture_key, halo_error_curve, halo_window  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["wan2.1", "wan2.2"], choices=["wan2.1", "wan2.2"])
    p.add_argument("--configs", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--latents", type=int, default=40, help="latent frames of the test video (1 + 4(n-1) pixels)")
    p.add_argument("--chunk-latents", type=int, default=2, help="latents of the chunk encoded with a halo")
    p.add_argument("--latent-hw", type=int, default=1, help="latent height = width (pixels = this * stride)")
    p.add_argument("--halo-min", type=int, default=0, help="first halo tried (pixel frames, multiple of 4)")
    p.add_argument("--halo-max", type=int, default=144, help="last halo tried (pixel frames)")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    return p.parse_args(argv)


@torch.no_grad()
def measure(vae: WanVAE, args, dtype: torch.dtype) -> list[tuple[int, float]]:
    if vae.dtype != dtype:
        vae.model.to(dtype)
    s = vae.spatial_stride
    frames = 1 + 4 * (args.latents - 1)
    g = torch.Generator().manual_seed(args.seed)
    hw = args.latent_hw * s
    video = (torch.rand(1, 3, frames, hw, hw, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    start, end = frames - 4 * args.chunk_latents, frames
    # Halos that reach frame 0 are exact by construction: nothing to measure there.
    halos = [h for h in range(args.halo_min, args.halo_max + 1, 4)
             if halo_window(start, end, h, vae.temporal_stride).raw_start > 0]
    return halo_error_curve(vae, video, start, end, halos, progress=True)


def first(curve, pred):
    """Smallest halo from which `pred` holds for every larger halo measured (the curve is not monotone)."""
    best = None
    for h, d in reversed(curve):
        if not pred(d):
            break
        best = h
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for config in args.configs:
        for kind in args.kinds:
            vae = WanVAE.random(kind, seed=args.seed, tiny=config == "tiny")
            for dt in args.dtypes:
                curve = measure(vae, args, getattr(torch, dt))
                at_tol = first(curve, lambda d: d <= args.tol)
                exact = first(curve, lambda d: d == 0.0 or (dt == "float64" and d <= 1e-12))
                name = f"{kind}{'-tiny' if config == 'tiny' else ''} vae encoder"
                print(f"\n{name} [{architecture_key(vae)}] {dt}: max|halo - full| by halo (pixel frames)")
                for h, d in curve:
                    print(f"  halo {h:4d} ({h // 4:3d} latents): {d:.3e}")
                print(f"  -> smallest halo with diff <= {args.tol:g}: {at_tol}; exactly equal from: {exact}")
                for metric, val in (("min halo frames (diff<=tol)", at_tol), ("min halo frames (exact)", exact)):
                    rows.append(record(args.out, f"{name} {dt} {metric}", metric, val, "pixel frames",
                                       arch=architecture_key(vae), tol=args.tol, curve=curve))
    print("\nsummary")
    for r in rows:
        print(f"  {r['name']:60s} {r['value']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
