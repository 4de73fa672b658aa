"""Describe a Wan DiT checkpoint: format, architecture, parameter count, dtypes, LoRA keys.

Reads only safetensors headers (no weights are loaded), so it is instant on large checkpoints.
num_heads is not stored in weights: it comes from config.json, a matching preset, or Wan's head_dim 128.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="Checkpoint file (.safetensors/.pt/.pth/.bin) or directory.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    parser.add_argument("--state-key", default=None, help="Entry of a .pt file holding the state dict.")
    parser.add_argument("--num-heads", type=int, default=None, help="Override the inferred head count.")


def _text(s: dict) -> str:
    lines = [f"path:        {s['path']}", f"format:      {s['format']}"
             + (f" (wrapper prefix {s['prefix']!r} stripped)" if s["prefix"] else ""),
             f"files:       {len(s['files'])}" + (" + config.json" if s["has_config_json"] else " (no config.json)")]
    if s["config"]:
        c = s["config"]
        lines += [f"preset:      {c['preset']}",
                  f"config:      dim={c['dim']} layers={c['num_layers']} heads={c['num_heads']} ffn={c['ffn_dim']} "
                  f"in_channels={c['in_channels']} out_channels={c['out_channels']} text_dim={c['text_dim']} "
                  f"freq_dim={c['freq_dim']} patch={tuple(c['patch_size'])}",
                  f"heads from:  {s['num_heads_from']}"]
    else:
        lines.append(f"config:      unknown ({s['config_error']})")
    lines += [f"parameters:  {s['num_parameters']:,} in {s['num_tensors']} tensors ({s['bytes'] / 2**30:.3f} GiB)",
              "dtypes:      " + ", ".join(f"{d}: {n:,}" for d, n in sorted(s["parameters_by_dtype"].items())),
              "lora:        " + (f"yes, {s['num_lora_tensors']} tensors, {s['num_lora_parameters']:,} parameters"
                                  if s["has_lora"] else "no")]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..models.wan.checkpoint_io import open_checkpoint
    from ..models.wan.convert import summarize

    summary = summarize(open_checkpoint(args.path, args.state_key), args.num_heads)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_text(summary))
    return 0
