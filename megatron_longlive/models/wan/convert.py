"""Wan DiT weight conversion: official <-> diffusers <-> native, and strict loading into `WanDiT`.

Native parameter names *are* the official Wan names (`blocks.0.self_attn.q.weight`), so native and
official differ only in file names and config.json; diffusers renames modules
(`blocks.0.attn1.to_q.weight`). Every tensor keeps its shape and bytes: conversion is a pure rename,
hence bitwise lossless. Key suffixes after the module path are carried over, so peft-style LoRA keys
(`...self_attn.q.lora_A.weight`) convert too. Any key outside the Wan T2V/TI2V DiT is an error.

Official <-> diffusers module names (block i):
    text_embedding.{0,2}   condition_embedder.text_embedder.linear_{1,2}
    time_embedding.{0,2}   condition_embedder.time_embedder.linear_{1,2}
    time_projection.1      condition_embedder.time_proj
    head.head / head.modulation          proj_out / scale_shift_table
    blocks.i.modulation                  blocks.i.scale_shift_table
    blocks.i.self_attn.{q,k,v,o}         blocks.i.attn1.to_{q,k,v,out.0}   (cross_attn: attn2)
    blocks.i.{self,cross}_attn.norm_{q,k}  blocks.i.attn{1,2}.norm_{q,k}
    blocks.i.norm3 (cross-attn norm)     blocks.i.norm2
    blocks.i.ffn.{0,2}                   blocks.i.ffn.net.{0.proj,2}
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

from ...config.model import ModelConfig
from . import checkpoint_io as io

FORMATS = ("native", "official", "diffusers")
LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lora.", ".lora_magnitude_vector")

_TOP = [("patch_embedding", "patch_embedding"),
        ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        ("time_projection.1", "condition_embedder.time_proj"),
        ("head.head", "proj_out"), ("head.modulation", "scale_shift_table")]
_BLOCK = [("modulation", "scale_shift_table"), ("norm3", "norm2"),
          ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK += [(f"{_ours}.{p}", f"{_theirs}.to_{p}") for p in "qkv"]
    _BLOCK += [(f"{_ours}.o", f"{_theirs}.to_out.0"), (f"{_ours}.norm_q", f"{_theirs}.norm_q"),
               (f"{_ours}.norm_k", f"{_theirs}.norm_k")]
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, src_col: int) -> str | None:
    """Rename one key from column `src_col` (0 = native, 1 = diffusers) to the other; None if unknown."""
    dst_col = 1 - src_col
    m = _BLOCK_RE.match(key)
    table, head, rest = (_BLOCK, f"blocks.{m.group(1)}.", m.group(2)) if m else (_TOP, "", key)
    for pair in table:
        name = pair[src_col]
        if rest == name or rest.startswith(name + "."):
            return head + pair[dst_col] + rest[len(name):]
    return None


def format_family(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}. Fix: use one of {', '.join(FORMATS)}.")
    return 1 if fmt == "diffusers" else 0


def rename_keys(keys: list[str], src: str, dst: str) -> dict[str, str]:
    """{new_key: old_key} for converting `keys` from format `src` to `dst`; unknown keys raise with the list."""
    s, d = format_family(src), format_family(dst)
    if s == d:
        return {k: k for k in keys}
    out, unknown = {}, []
    for k in keys:
        new = _rename(k, s)
        (unknown.append(k) if new is None else out.__setitem__(new, k))
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not part of a Wan T2V/TI2V DiT in {src} format: "
                         f"{_fmt_list(unknown)}. Fix: remove them (image-to-video keys are not supported).")
    return out


def detect_key_format(keys: list[str]) -> str:
    """'official' (= native names) or 'diffusers', from module names; raises if neither or mixed."""
    base = [k for k in keys if not is_lora_key(k)] or list(keys)
    ours = sum(_rename(k, 0) is not None for k in base)
    theirs = sum(_rename(k, 1) is not None for k in base)
    # patch_embedding is named the same in both; decide on the other keys
    shared = sum(k.startswith("patch_embedding") for k in base)
    ours, theirs = ours - shared, theirs - shared
    if ours and not theirs:
        return "official"
    if theirs and not ours:
        return "diffusers"
    if ours and theirs:
        raise ValueError(f"checkpoint mixes official-style ({ours}) and diffusers-style ({theirs}) keys. "
                         f"Fix: convert each part separately.")
    raise ValueError(f"not a Wan DiT checkpoint: no known key among {_fmt_list(sorted(keys), 8)}.")


def detect_format(src: io.TensorSource) -> str:
    """Format of an opened checkpoint: 'native' only when our own config.json sits beside it."""
    fmt = detect_key_format(src.keys())
    if fmt == "official" and src.config_json is not None and src.config_json.get("_format") == "megatron_longlive":
        return "native"
    return fmt


def is_lora_key(key: str) -> bool:
    return any(m in key for m in LORA_MARKERS)


def _fmt_list(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... and {len(keys) - limit} more' if len(keys) > limit else ''}]"


def natural_key(key: str) -> tuple:
    """Sort 'blocks.10' after 'blocks.9'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


# ----- config inference from shapes ----------------------------------------------------------------
def infer_config(shapes: dict[str, tuple], fmt: str, num_heads: int | None = None) -> tuple[ModelConfig, str]:
    """Architecture from tensor shapes. num_heads is not stored in weights: it comes from `num_heads`, a preset
    with the same numbers, or Wan's head_dim of 128. Returns (config, where num_heads came from)."""
    only_lora = bool(shapes) and all(is_lora_key(k) for k in shapes)
    if format_family(fmt):
        shapes = {_rename(k, 1): s for k, s in shapes.items() if not is_lora_key(k) and _rename(k, 1) is not None}
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "blocks.0.ffn.0.weight",
            "head.head.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the architecture: missing {missing}"
                         + (" (the file holds only LoRA adapter tensors)." if only_lora else "."))
    dim, in_ch, *patch = shapes["patch_embedding.weight"]
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))}
    fields = dict(in_channels=in_ch, out_channels=shapes["head.head.weight"][0] // math.prod(patch), dim=dim,
                  ffn_dim=shapes["blocks.0.ffn.0.weight"][0], num_layers=max(layers) + 1,
                  text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
                  patch_size=tuple(patch), qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
                  cross_attn_norm="blocks.0.norm3.weight" in shapes)
    source = "--num-heads"
    if num_heads is None:
        preset = io.match_preset(fields)
        if preset:
            num_heads, source = io.preset_config(preset).num_heads, f"preset {preset}"
        elif dim % 128 == 0:
            num_heads, source = dim // 128, "assumed head_dim 128 (Wan); not stored in weights"
        else:
            raise ValueError(f"cannot infer num_heads for dim={dim} (not stored in weights). Fix: pass --num-heads.")
    return io.model_config_from_fields({**fields, "num_heads": num_heads}), source


def checkpoint_config(src: io.TensorSource, fmt: str, num_heads: int | None = None) -> tuple[ModelConfig, str]:
    """The config.json beside the weights if present (checked against the shapes), else inferred from shapes."""
    inferred, source = infer_config(src.shapes, fmt, num_heads)
    if src.config_json is None:
        return inferred, source
    _, cfg = io.read_config_json(src.config_json, f"{src.path}/config.json")
    diff = [f for f in io.ARCH_FIELDS if getattr(cfg, f) != getattr(inferred, f)]
    if diff:
        raise ValueError(f"{src.path}/config.json disagrees with the weights on " + ", ".join(
            f"{f} (config {getattr(cfg, f)}, weights {getattr(inferred, f)})" for f in diff) + ". Fix: repair the file.")
    return cfg, "config.json"


# ----- conversion ----------------------------------------------------------------------------------
DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert_checkpoint(src_path: str, dst: str, to: str, max_shard_size: str | int = "5GB", dtype: str = "keep",
                       state_key: str | None = None, num_heads: int | None = None, progress: bool = True) -> dict:
    """Convert a checkpoint file/directory to format `to`, writing safetensors (+ config.json for directories).

    Streams: holds one output shard in memory. Returns a summary dict (formats, files, config, tensor count).
    """
    format_family(to)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: unknown. Fix: use one of {', '.join(DTYPES)}.")
    limit = io.parse_size(max_shard_size)
    src = io.open_checkpoint(src_path, state_key)
    src_fmt = detect_format(src)
    cfg, heads_from = checkpoint_config(src, src_fmt, num_heads)
    mapping = rename_keys(src.keys(), src_fmt, to)  # new -> old
    names = sorted(mapping, key=natural_key)
    target = DTYPES[dtype]

    def out_dtype(old: str) -> torch.dtype:
        d = src.dtypes[old]
        return target if target is not None and d.is_floating_point else d

    def get(new: str) -> torch.Tensor:
        old = mapping[new]
        return src.get(old).to(out_dtype(old))

    nbytes = {n: src.nbytes(mapping[n], out_dtype(mapping[n])) for n in names}
    if os.path.abspath(dst) == os.path.abspath(src_path):
        raise ValueError(f"--dst {dst} equals --src. Fix: write to a new directory.")
    files = _write(names, get, nbytes, os.fspath(dst), to, cfg, limit, progress)
    return {"source_format": src_fmt, "format": to, "files": files, "num_tensors": len(names),
            "config": cfg.to_dict(), "num_heads_from": heads_from}


def _write(names, get, nbytes, dst: str, to: str, cfg: ModelConfig, limit: int, progress: bool) -> list[str]:
    if os.path.isdir(dst) and any(f.endswith((".safetensors", ".index.json")) for f in os.listdir(dst)):
        raise ValueError(f"--dst {dst} already holds weights. Fix: choose an empty or new directory.")
    files = io.write_safetensors(names, get, nbytes, dst, io.BASE_NAMES[to], limit, progress)
    if not dst.endswith(".safetensors"):
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(io.config_json_for(to, cfg), f, indent=2)
    return files


def save_wan_weights(model: nn.Module, dst: str | os.PathLike, to: str = "native",
                     max_shard_size: str | int = "5GB", progress: bool = False) -> list[str]:
    """Save a WanDiT's weights in format `to` (directory: safetensors shards + config.json; or one .safetensors)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    mapping = rename_keys(list(sd), "native", to)
    names = sorted(mapping, key=natural_key)
    nbytes = {n: sd[mapping[n]].nbytes for n in names}
    return _write(names, lambda n: sd[mapping[n]], nbytes, os.fspath(dst), to, model.cfg,
                  io.parse_size(max_shard_size), progress)


def to_native_state_dict(path_or_state_dict, state_key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read any supported checkpoint (or an in-memory state dict) with native key names -> (state dict, format)."""
    if isinstance(path_or_state_dict, dict):
        prefix = io.common_prefix(path_or_state_dict)
        sd = {k[len(prefix):]: v for k, v in path_or_state_dict.items()}
        fmt = detect_key_format(list(sd))
        return {new: sd[old] for new, old in rename_keys(list(sd), fmt, "native").items()}, fmt
    src = io.open_checkpoint(path_or_state_dict, state_key)
    fmt = detect_format(src)
    return {new: src.get(old) for new, old in rename_keys(src.keys(), fmt, "native").items()}, fmt


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model; the message lists them."""


def _describe(cfg: ModelConfig) -> str:
    return (f"dim={cfg.dim}, num_layers={cfg.num_layers}, ffn_dim={cfg.ffn_dim}, in_channels={cfg.in_channels}, "
            f"text_dim={cfg.text_dim}")


def _hint(sd: dict, fmt: str, model_cfg: ModelConfig | None) -> str:
    hints = []
    if any(is_lora_key(k) for k in sd):
        hints.append("the checkpoint contains LoRA keys (lora_A/lora_B); merge them into the base weights first")
    if model_cfg is not None:
        shapes, ckpt_cfg = {k: tuple(v.shape) for k, v in sd.items()}, None
        for heads in (None, model_cfg.num_heads):  # a preset's / Wan's head count, else the model's
            try:
                ckpt_cfg = infer_config(shapes, "official", heads)[0]
                break
            except ValueError:
                continue
        if ckpt_cfg is not None and any(getattr(ckpt_cfg, f) != getattr(model_cfg, f) for f in io.ARCH_FIELDS):
            what = f"a {ckpt_cfg.preset} model" if ckpt_cfg.preset != "custom" else "a custom model"
            fix = f"set model.preset={ckpt_cfg.preset}" if ckpt_cfg.preset != "custom" else "match model.* to it"
            article = "an" if fmt[0] in "aeiou" else "a"
            hints.append(f"this looks like {article} {fmt} checkpoint of {what} ({_describe(ckpt_cfg)}); your config is "
                         f"{model_cfg.preset} ({_describe(model_cfg)}). Fix: {fix}")
    return "".join(f"\nHint: {h}." for h in hints)


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], fmt: str = "official",
                     where: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and mis-shaped keys (nothing silently ignored)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd), key=natural_key)
    unexpected = sorted(set(sd) - set(expected), key=natural_key)
    shapes = [f"{k} (expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)})"
              for k in sorted(set(sd) & set(expected), key=natural_key) if sd[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{where} does not fit the model ({fmt} keys, shown with native names):"]
    if missing:
        parts.append(f"  missing keys ({len(missing)}): {_fmt_list(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_list(unexpected)}")
    if shapes:
        parts.append(f"  mis-shaped keys ({len(shapes)}): {_fmt_list(shapes)}")
    raise CheckpointMismatchError("\n".join(parts) + _hint(sd, fmt, getattr(model, "cfg", None)))


@torch.no_grad()
def load_wan_weights(model: nn.Module, path_or_state_dict, state_key: str | None = None,
                     assign: bool = False) -> str:
    """Strictly load an official / diffusers / native checkpoint (path or state dict) into a WanDiT.

    Tensors are cast to the model's dtypes. Returns the detected source format.
    """
    where = path_or_state_dict if isinstance(path_or_state_dict, (str, os.PathLike)) else "state dict"
    sd, fmt = to_native_state_dict(path_or_state_dict, state_key)
    check_state_dict(model, sd, fmt, str(where))
    model.load_state_dict(sd, strict=True, assign=assign)
    return fmt


def summarize(src: io.TensorSource, num_heads: int | None = None) -> dict:
    """What `longlive info` prints: format, config, parameter count, dtypes, LoRA presence."""
    fmt = detect_format(src)
    base = [k for k in src.keys() if not is_lora_key(k)]
    lora = [k for k in src.keys() if is_lora_key(k)]
    try:
        cfg, heads_from = checkpoint_config(src, fmt, num_heads)
        config, error = cfg.to_dict(), None
    except ValueError as e:
        config, heads_from, error = None, None, str(e)
    dtypes = Counter()
    for k in src.keys():
        dtypes[str(src.dtypes[k]).replace("torch.", "")] += math.prod(src.shapes[k])
    return {"path": src.path, "format": fmt, "files": src.files, "prefix": src.prefix,
            "has_config_json": src.config_json is not None, "config": config, "num_heads_from": heads_from,
            "config_error": error, "num_tensors": len(src.keys()),
            "num_parameters": sum(math.prod(src.shapes[k]) for k in base),
            "num_lora_parameters": sum(math.prod(src.shapes[k]) for k in lora), "has_lora": bool(lora),
            "num_lora_tensors": len(lora), "parameters_by_dtype": dict(dtypes),
            "bytes": sum(src.nbytes(k) for k in src.keys())}
