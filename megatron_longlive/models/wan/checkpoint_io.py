"""Checkpoint files and config.json flavours for Wan DiTs: read lazily, write sharded safetensors.

Reading: `open_checkpoint(path)` accepts a `.safetensors` / `.pt` / `.pth` / `.bin` file or a directory
(a sharded safetensors set with its `*.safetensors.index.json`, a single weights file, and optionally a
`config.json`). Tensors are read lazily (safetensors headers give shapes and dtypes without loading), so
`longlive info` on a 14B checkpoint costs no memory and conversion holds one output shard at a time.
Wrapper prefixes (`model.diffusion_model.` from ComfyUI, peft's `base_model.model.`, `module.` ...) and nested
`.pt` containers (`{"generator": state_dict}`) are unwrapped.

Writing: `write_safetensors` splits tensors into shards of at most `max_shard_size` bytes named like
diffusers/transformers (`<base>-00001-of-00003.safetensors` + `<base>.safetensors.index.json`), so
`WanTransformer3DModel.from_pretrained(dir)` reads them.

Config flavours: official Wan (`WanModel`: dim, in_dim, num_heads ...), diffusers
(`WanTransformer3DModel`: num_attention_heads, attention_head_dim ...), native (our `ModelConfig`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ...config.model import _PRESETS, ModelConfig, preset_config

# Wrapper prefixes seen in the wild, longest first (stripped only when every key carries one).
KNOWN_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "_orig_mod.", "module.",
                  "transformer.", "model.")
# Containers inside .pt files, tried in order when the top-level dict is not itself a state dict.
CONTAINER_KEYS = ("state_dict", "model", "module", "generator_ema", "generator", "transformer")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Base file names of each output format (directory outputs).
BASE_NAMES = {"native": "model", "official": "diffusion_pytorch_model", "diffusers": "diffusion_pytorch_model"}


class TensorSource:
    """A lazily read set of named tensors: names, shapes and dtypes up front, data on `get`."""

    def __init__(self, path: str, files: list[str], shapes: dict, dtypes: dict, loader: Callable[[str], torch.Tensor],
                 prefix: str = "", config_json: dict | None = None):
        self.path, self.files, self.prefix, self.config_json = path, files, prefix, config_json
        self.shapes: dict[str, tuple[int, ...]] = shapes
        self.dtypes: dict[str, torch.dtype] = dtypes
        self._loader = loader

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        return self._loader(key)

    def nbytes(self, key: str, dtype: torch.dtype | None = None) -> int:
        return math.prod(self.shapes[key]) * (dtype or self.dtypes[key]).itemsize


def common_prefix(keys: Iterable[str]) -> str:
    """Wrapper prefix shared by all keys (no Wan or diffusers module name starts with one of KNOWN_PREFIXES)."""
    keys = list(keys)
    prefix = ""
    while keys:
        found = next((p for p in KNOWN_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if found is None:
            break
        prefix += found
        keys = [k[len(found):] for k in keys]
    return prefix


def _load_torch_file(path: str, state_key: str | None) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}.")
    if state_key is not None:
        if state_key not in obj:
            raise ValueError(f"{path}: no entry {state_key!r}; top-level keys: {sorted(obj)[:20]}. "
                             f"Fix: pass one of them as --state-key.")
        obj = obj[state_key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"{path}: not a flat state dict and none of {CONTAINER_KEYS} holds one; top-level "
                             f"keys: {sorted(map(str, obj))[:20]}. Fix: pass the right entry as --state-key.")
        obj = obj[inner]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}. Fix: pass the state-dict entry as "
                         f"--state-key.")
    return obj


def _weight_files(directory: str) -> list[str]:
    names = sorted(os.listdir(directory))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(index) > 1:
        raise ValueError(f"{directory}: several index files {index}. Fix: point at one checkpoint directory.")
    if index:
        with open(os.path.join(directory, index[0])) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{directory}/{index[0]}: no 'weight_map'. Fix: regenerate the index file.")
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.exists(os.path.join(directory, n))]
        if missing:
            raise FileNotFoundError(f"{directory}: shards listed in {index[0]} are missing: {missing}.")
        return [os.path.join(directory, n) for n in files]
    for suffix in WEIGHT_SUFFIXES:
        found = [n for n in names if n.endswith(suffix)]
        if len(found) == 1:
            return [os.path.join(directory, found[0])]
        if len(found) > 1:
            if suffix == ".safetensors":  # shards without an index: take them all
                return [os.path.join(directory, n) for n in found]
            raise ValueError(f"{directory}: several weight files {found}. Fix: pass one file as the path.")
    raise FileNotFoundError(f"{directory}: no weights (*.safetensors, *.pt, *.pth, *.bin) found.")


def open_checkpoint(path: str | os.PathLike, state_key: str | None = None) -> TensorSource:
    """Open a checkpoint file or directory lazily; strips wrapper prefixes (see module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found.")
    config_json = None
    if os.path.isdir(path):
        files = _weight_files(path)
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config_json = json.load(f)
    else:
        if not path.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"{path}: unknown weight file type. Fix: use .safetensors, .pt, .pth or .bin.")
        files = [path]
    shapes, dtypes, where = {}, {}, {}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k], dtypes[k], where[k] = tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()], file
        else:
            for k, v in _load_torch_file(file, state_key).items():
                shapes[k], dtypes[k], where[k] = tuple(v.shape), v.dtype, file
                tensors[k] = v
    if not shapes:
        raise ValueError(f"{path}: the checkpoint holds no tensors.")
    prefix = common_prefix(shapes)

    def load(key: str) -> torch.Tensor:
        full = prefix + key
        if full in tensors:
            return tensors[full].contiguous().clone()  # own storage: safetensors refuses shared memory
        with safe_open(where[full], framework="pt") as f:
            return f.get_tensor(full)

    n = len(prefix)
    return TensorSource(path, files, {k[n:]: s for k, s in shapes.items()}, {k[n:]: d for k, d in dtypes.items()},
                        load, prefix, config_json)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1.5GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ValueError(f"max shard size {text!r}: not a size. Fix: write e.g. 5GB, 500MB or 2GiB.")
    return int(value * units[unit])


def plan_shards(names: list[str], nbytes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Greedy split of `names` (in order) into shards of at most `max_shard_size` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def write_safetensors(names: list[str], get: Callable[[str], torch.Tensor], nbytes: dict[str, int], out: str,
                      base_name: str, max_shard_size: int, progress: bool = True) -> list[str]:
    """Write tensors `get(name)` to `out` (a directory, or a single `.safetensors` file). Returns the files."""
    if out.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_file({n: get(n) for n in tqdm(names, desc="tensors", disable=not progress)}, out,
                  metadata={"format": "pt"})
        return [out]
    os.makedirs(out, exist_ok=True)
    shards = plan_shards(names, nbytes, max_shard_size)
    if len(shards) == 1:
        files = [f"{base_name}.safetensors"]
    else:
        files = [f"{base_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, file in tqdm(list(zip(shards, files)), desc="shards", unit="shard", disable=not progress):
        save_file({n: get(n) for n in shard}, os.path.join(out, file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes[n] for n in names)},
                 "weight_map": {n: f for shard, f in zip(shards, files) for n in shard}}
        with open(os.path.join(out, f"{base_name}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return [os.path.join(out, f) for f in files]


# ----- config.json flavours --------------------------------------------------------------------------
ARCH_FIELDS = ("in_channels", "out_channels", "dim", "ffn_dim", "num_layers", "text_dim", "freq_dim", "patch_size",
               "qk_norm", "cross_attn_norm")


def match_preset(cfg_fields: dict) -> str | None:
    """The preset whose architecture numbers equal `cfg_fields` (num_heads compared only when given)."""
    for name in _PRESETS:
        ref = preset_config(name)
        if all(tuple(cfg_fields[f]) == tuple(getattr(ref, f)) if f == "patch_size" else
               cfg_fields[f] == getattr(ref, f) for f in ARCH_FIELDS if f in cfg_fields) and \
                cfg_fields.get("num_heads", ref.num_heads) == ref.num_heads:
            return name
    return None


def model_config_from_fields(fields: dict) -> ModelConfig:
    """Our ModelConfig from architecture fields; text_len/vae/preset come from a matching preset or Wan defaults."""
    fields = dict(fields)
    preset = match_preset(fields)
    base = preset_config(preset) if preset else None
    fields.setdefault("text_len", base.text_len if base else 512)
    fields.setdefault("vae", "wan2.2" if fields.get("in_channels") == 48 else "wan2.1")
    fields["patch_size"] = tuple(fields.get("patch_size", (1, 2, 2)))
    return ModelConfig(preset=preset or "custom", **fields)


def config_from_official(d: dict) -> ModelConfig:
    if d.get("model_type", "t2v") not in ("t2v", "ti2v"):
        raise ValueError(f"official config model_type={d['model_type']!r} is not supported. Fix: use a T2V or TI2V "
                         f"Wan checkpoint.")
    qk_norm, cross = d.get("qk_norm", True), d.get("cross_attn_norm", True)
    return model_config_from_fields(dict(
        in_channels=d["in_dim"], out_channels=d.get("out_dim", d["in_dim"]), dim=d["dim"], ffn_dim=d["ffn_dim"],
        num_heads=d["num_heads"], num_layers=d["num_layers"], text_dim=d.get("text_dim", 4096),
        text_len=d.get("text_len", 512), freq_dim=d.get("freq_dim", 256), patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        qk_norm=bool(qk_norm), cross_attn_norm=bool(cross), eps=float(d.get("eps", 1e-6))))


def config_to_official(cfg: ModelConfig) -> dict:
    return {"_class_name": "WanModel", "model_type": "ti2v" if cfg.in_channels == 48 else "t2v",
            "patch_size": list(cfg.patch_size), "text_len": cfg.text_len, "in_dim": cfg.in_channels, "dim": cfg.dim,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_channels,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "window_size": [-1, -1],
            "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps}


def config_from_diffusers(d: dict) -> ModelConfig:
    qk = d.get("qk_norm", "rms_norm_across_heads")
    if qk not in ("rms_norm_across_heads", None):
        raise ValueError(f"diffusers config qk_norm={qk!r} is not supported. Fix: only 'rms_norm_across_heads' "
                         f"(Wan) or null.")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if d.get(key) is not None:
            raise ValueError(f"diffusers config {key}={d[key]} (an image-to-video model) is not supported. "
                             f"Fix: use a T2V or TI2V Wan checkpoint.")
    heads, head_dim = d.get("num_attention_heads", 40), d.get("attention_head_dim", 128)
    fields = dict(in_channels=d.get("in_channels", 16), out_channels=d.get("out_channels") or d.get("in_channels", 16),
                  dim=heads * head_dim, ffn_dim=d.get("ffn_dim", 13824), num_heads=heads,
                  num_layers=d.get("num_layers", 40), text_dim=d.get("text_dim", 4096), freq_dim=d.get("freq_dim", 256),
                  patch_size=tuple(d.get("patch_size", (1, 2, 2))), qk_norm=qk is not None,
                  cross_attn_norm=bool(d.get("cross_attn_norm", True)), eps=float(d.get("eps", 1e-6)))
    return model_config_from_fields(fields)


def config_to_diffusers(cfg: ModelConfig) -> dict:
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
            "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "eps": cfg.eps, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


def config_to_native(cfg: ModelConfig) -> dict:
    d = cfg.to_dict()
    d["patch_size"] = list(cfg.patch_size)
    return {"_class_name": "WanDiT", "_format": "megatron_longlive", "model": d}


def read_config_json(d: dict, where: str = "config.json") -> tuple[str, ModelConfig]:
    """Recognise a config.json flavour -> (format, ModelConfig)."""
    try:
        if d.get("_format") == "megatron_longlive":
            return "native", ModelConfig(**d["model"])
        if "num_attention_heads" in d or d.get("_class_name") == "WanTransformer3DModel":
            return "diffusers", config_from_diffusers(d)
        if "in_dim" in d and "dim" in d:
            return "official", config_from_official(d)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: incomplete or malformed Wan config ({e!r}). Fix: repair or remove the file.")
    raise ValueError(f"{where}: not a Wan DiT config (neither official WanModel, diffusers WanTransformer3DModel "
                     f"nor megatron_longlive). Fix: remove it or pass the weights file itself.")


def config_json_for(fmt: str, cfg: ModelConfig) -> dict:
    return {"native": config_to_native, "official": config_to_official, "diffusers": config_to_diffusers}[fmt](cfg)
