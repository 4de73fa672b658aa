"""Convert Wan DiT weights between official, diffusers and native formats (safetensors, sharded).

The source (a file or a checkpoint directory) is detected from its key names and config.json; the
output directory gets safetensors shards (with an index json when split) and the matching
config.json: diffusers output loads with `WanTransformer3DModel.from_pretrained(dir)`, official
output carries Wan's config keys. A `.safetensors` destination writes one file and no config (all tensors in memory
at once; directories hold one shard at a time).
Conversion renames keys only, so `--dtype keep` is bitwise lossless.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="Checkpoint file (.safetensors/.pt/.pth/.bin) or directory.")
    parser.add_argument("--dst", required=True, help="Output directory (or a single .safetensors file).")
    parser.add_argument("--to", required=True, choices=("native", "official", "diffusers"), help="Output format.")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest shard, e.g. 5GB, 500MB (default 5GB).")
    parser.add_argument("--dtype", default="keep", choices=("keep", "fp32", "bf16"),
                        help="Cast floating tensors (default: keep the source dtypes).")
    parser.add_argument("--state-key", default=None,
                        help="Entry of a .pt file holding the state dict (default: auto, e.g. 'generator_ema').")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="Attention heads, when the source has no config.json and is no known preset.")
    parser.add_argument("--merge-lora", default=None, metavar="ADAPTER_DIR",
                        help="Fold a peft LoRA directory (e.g. from `longlive distill`) into the weights first.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar or summary.")


def run(args: argparse.Namespace) -> int:
    from ..models.wan.convert import convert_checkpoint

    if args.merge_lora:
        from ..training.lora_switch import merge_lora_checkpoint

        summary = merge_lora_checkpoint(args.src, args.dst, args.to, args.merge_lora, args.max_shard_size, args.dtype,
                                        args.state_key, args.num_heads, progress=not args.quiet)
    else:
        summary = convert_checkpoint(args.src, args.dst, args.to, args.max_shard_size, args.dtype, args.state_key,
                                     args.num_heads, progress=not args.quiet)
    if not args.quiet:
        cfg = summary["config"]
        print(f"converted {summary['source_format']} -> {summary['format']}: {summary['num_tensors']} tensors in "
              f"{len(summary['files'])} file(s) under {args.dst}")
        print(json.dumps({k: cfg[k] for k in ("preset", "dim", "num_layers", "num_heads", "ffn_dim", "in_channels")}))
    return 0
