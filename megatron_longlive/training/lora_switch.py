"""Several named LoRA adapters on one frozen base, switched at run time (no copy of the base weights).

DMD needs three networks that differ only by adapters: the generator (adapter "generator"), the critic
/ fake score (adapter "critic") and the teacher / real score (no adapter). `add_adapter` wraps target
linears in `MultiLoRALinear` (peft's layout: `base_layer`, `lora_A[name]`, `lora_B[name]`) and
`use_adapter(model, name)` selects which adapter is live (None = the bare base). Files are peft's LoRA
format (`base_model.model.<module>.lora_{A,B}.weight` + adapter_config.json, one adapter per
directory), written and read by `training/lora.py`'s helpers; loading validates the file against the
base (target modules, rank/alpha, layer shapes) with errors naming the file, the field and the fix.

Also here: merging an adapter file into a state dict (`longlive convert --merge-lora`), the
native -> diffusers adapter conversion (module names from `models/wan/convert.py`), and loading a
base checkpoint plus an adapter for few-step sampling (merged, or kept separate and switchable).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
from torch import nn

from ..models.wan.convert import rename_keys
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _matches, read_adapter_files, write_adapter_files

PEFT_PREFIX = "base_model.model."


class MultiLoRALinear(nn.Module):
    """A frozen linear plus named low-rank updates; y = base(x) + B_a(A_a(x)) * alpha_a / r_a for the active a."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.active: str | None = None

    def add(self, name: str, rank: int, alpha: float, dtype: torch.dtype | None = None,
            generator: torch.Generator | None = None) -> None:
        """A new adapter: A Kaiming-uniform, B zero (starts at the base model, as peft). With a (CPU) `generator`
        A is drawn on the CPU in float32 and copied, so the init does not depend on the device or the global RNG."""
        ref = next(iter(self.base_layer.parameters()), None)
        ref = ref if ref is not None else getattr(self.base_layer, "bias", None)  # packed bases: buffers only
        device = ref.device if ref is not None else next(self.base_layer.buffers()).device
        dtype = dtype or (ref.dtype if ref is not None else torch.float32)
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        if generator is None:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                a = nn.init.kaiming_uniform_(torch.empty(rank, self.in_features), a=math.sqrt(5), generator=generator)
                self.lora_A[name].weight.copy_(a)
        nn.init.zeros_(self.lora_B[name].weight)
        self.rank[name], self.alpha[name] = rank, alpha

    def scaling(self, name: str) -> float:
        return self.alpha[name] / self.rank[name]

    def delta(self, name: str) -> torch.Tensor:
        """[out, in] float32 weight update of adapter `name`."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active is None:
            return y
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        return y + b(a(x.to(a.weight.dtype))).to(y.dtype) * self.scaling(self.active)


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def add_adapter(model: nn.Module, name: str, targets: list[str], rank: int, alpha: float = 0.0,
                dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> list[str]:
    """Freeze the base and add adapter `name` (rank, alpha; 0 = rank) on every target linear. Returns module names.
    generator: a CPU generator for a reproducible, device-independent init (default: the global RNG).

    Targets are module-name suffixes ("self_attn.q", "ffn.0"); a target that matches nothing is an error."""
    alpha = alpha or float(rank)
    keep = {id(p) for m in multi_lora_modules(model).values() for p in m.parameters() if p is not m.base_layer}
    keep -= {id(p) for m in multi_lora_modules(model).values() for p in m.base_layer.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    wrapped = multi_lora_modules(model)
    names = [n for n, m in model.named_modules() if _matches(n, targets) and hasattr(m, "in_features")
             and not isinstance(m, MultiLoRALinear) and ".lora_A." not in n + "." and ".lora_B." not in n + "."
             and not any(n.startswith(w + ".") for w in wrapped)]
    names = sorted(set(names) | {n for n in wrapped if _matches(n, targets)})
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no linear module of the model. Fix: use module-name "
                         f"suffixes such as 'self_attn.q', 'cross_attn.o' or 'ffn.0'.")
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, MultiLoRALinear):
            m = MultiLoRALinear(m)
            _set_module(model, n, m)
        if name in m.lora_A:
            raise ValueError(f"adapter {name!r} already exists on {n}")
        m.add(name, rank, alpha, dtype, generator)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def set_active(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` live on every wrapped linear (None: the bare base)."""
    for n, m in multi_lora_modules(model).items():
        if name is not None and name not in m.lora_A:
            raise KeyError(f"{n} has no adapter {name!r} (it has {sorted(m.lora_A)})")
        m.active = name


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """`with use_adapter(model, "critic"): ...` - the previous selection is restored afterwards."""
    mods = multi_lora_modules(model)
    before = {n: m.active for n, m in mods.items()}
    set_active(model, name)
    try:
        yield model
    finally:
        for n, m in mods.items():
            m.active = before[n]


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    out = []
    for m in multi_lora_modules(model).values():
        out += [m.lora_A[name].weight, m.lora_B[name].weight]
    return out


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """peft-named tensors of one adapter: base_model.model.<module>.lora_{A,B}.weight."""
    out = {}
    for n, m in multi_lora_modules(model).items():
        out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A[name].weight.detach()
        out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B[name].weight.detach()
    return out


def save_named_adapter(model: nn.Module, name: str, directory: str, targets: list[str]) -> None:
    """Write adapter `name` as a peft LoRA directory (adapter_model.safetensors + adapter_config.json)."""
    mods = multi_lora_modules(model)
    assert mods, "save_named_adapter: the model has no LoRA modules"
    first = next(iter(mods.values()))
    write_adapter_files(directory, adapter_tensors(model, name), first.rank[name], first.alpha[name], targets)


# ----- reading and validating adapter files -------------------------------------------------------------
def _module_of(key: str, where: str) -> tuple[str, str]:
    """'base_model.model.blocks.0.self_attn.q.lora_A.weight' -> ('blocks.0.self_attn.q', 'A')."""
    k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if k.endswith(suffix):
            return k[: -len(suffix)], part
    raise ValueError(f"{where}: tensor {key!r} is not a LoRA lora_A/lora_B weight. Fix: use a peft LoRA file.")


def read_checked_adapter(model: nn.Module, directory: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a peft LoRA directory and check it against `model` (native module names).

    Returns (config, {module: (A [r, in], B [out, r])}). Errors: target modules that match no linear of the
    base, tensors of modules the base lacks or that the targets do not cover, a rank that disagrees with
    adapter_config.json's `r`, a missing lora_alpha, and layer shapes of a base of another config."""
    config, tensors = read_adapter_files(directory)
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{cfg_path}: missing field {field!r}. Fix: write the adapter with save_named_adapter or "
                             f"peft's save_pretrained.")
    rank, targets = int(config["r"]), config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    linears = {n: m for n, m in model.named_modules() if hasattr(m, "in_features")
               and not n.endswith((".lora_A", ".lora_B")) and ".lora_A." not in n and ".lora_B." not in n}
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n in linears)]
    if unmatched:
        raise ValueError(f"{cfg_path}: target_modules {unmatched} match no linear module of the base model. Fix: use "
                         f"an adapter trained on this model family (native Wan names such as 'self_attn.q'; convert "
                         f"diffusers adapters with to_native_adapter).")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, part = _module_of(key, w_path)
        pairs.setdefault(module, {})[part] = t
    unknown = sorted(m for m in pairs if m not in linears)
    if unknown:
        raise ValueError(f"{w_path}: adapter tensors for modules the base model does not have: {unknown[:4]}. Fix: "
                         f"load the adapter into the model family it was trained on.")
    uncovered = sorted(m for m in pairs if not _matches(m, targets))
    if uncovered:
        raise ValueError(f"{w_path}: modules {uncovered[:4]} are not covered by target_modules={targets} in "
                         f"{cfg_path}. Fix: repair target_modules.")
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_path}: {module} has only lora_{''.join(ab)}. Fix: re-save the adapter.")
        a, b = ab["A"], ab["B"]
        base = linears[module]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{w_path}: {module} has rank {a.shape[0]} (lora_A {tuple(a.shape)}, lora_B "
                             f"{tuple(b.shape)}) but {cfg_path} says r={rank}. Fix: make r match the tensors.")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise ValueError(f"{w_path}: {module} adapter is {a.shape[1]}->{b.shape[0]} but the base layer is "
                             f"{base.in_features}->{base.out_features}: the adapter was trained on a base of another "
                             f"config. Fix: load it into the base model it was trained on (same model.preset).")
        out[module] = (a, b)
    return config, out


def load_named_adapter(model: nn.Module, name: str, directory: str) -> list[str]:
    """Add adapter `name` to `model` from a peft LoRA directory (validated, see read_checked_adapter)."""
    config, pairs = read_checked_adapter(model, directory)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    existing = multi_lora_modules(model)
    for n, m in existing.items():
        if name in m.lora_A and (m.rank[name], m.alpha[name]) != (rank, alpha):
            raise ValueError(f"{directory}: adapter {name!r} exists with r={m.rank[name]}, alpha={m.alpha[name]} but "
                             f"the file has r={rank}, lora_alpha={alpha}. Fix: load it under a new name.")
    names = list(pairs)
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, MultiLoRALinear):
            m = MultiLoRALinear(m)
            _set_module(model, n, m)
        if name not in m.lora_A:
            m.add(name, rank, alpha)
        with torch.no_grad():
            m.lora_A[name].weight.copy_(pairs[n][0])
            m.lora_B[name].weight.copy_(pairs[n][1])
    for p in model.parameters():
        p.requires_grad_(False)
    return names


# ----- merging ---------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights (W += alpha/r * B @ A) and unwrap every MultiLoRALinear."""
    for n, m in multi_lora_modules(model).items():
        base = m.base_layer
        if name in m.lora_A:
            base.weight.add_(m.delta(name).to(base.weight.dtype))
        _set_module(model, n, base)


@torch.no_grad()
def merge_adapter_into_state_dict(sd: dict[str, torch.Tensor], directory: str, model: nn.Module) -> dict:
    """Native-named state dict + peft LoRA directory -> merged state dict (W += alpha/r * B @ A, float32 math).

    `model` is a module of the base's architecture (checked against the adapter); `sd` is not modified."""
    config, pairs = read_checked_adapter(model, directory)
    scaling = float(config["lora_alpha"]) / int(config["r"])
    out = dict(sd)
    for module, (a, b) in pairs.items():
        key = f"{module}.weight"
        w = sd[key]
        out[key] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
    return out


# ----- native <-> diffusers adapter names --------------------------------------------------------------------
def convert_adapter(src_dir: str, dst_dir: str, to: str = "diffusers", src: str = "native") -> None:
    """Rename a peft LoRA directory's module names between native (official Wan) and diffusers names, using the
    checkpoint converter's key mapping; tensors are copied bitwise."""
    config, tensors = read_adapter_files(src_dir)
    stripped = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    mapping = rename_keys(list(stripped), src, to)               # new -> old
    renamed = {PEFT_PREFIX + new: stripped[old] for new, old in mapping.items()}
    # targets are suffixes: rename them as modules of block 0 (or top-level modules) and keep the suffix
    targets = []
    for t in config["target_modules"]:
        probe = t if not t.startswith("blocks.") and "." in t and t.split(".")[0] in _TOP_NAMES else f"blocks.0.{t}"
        new = next(iter(rename_keys([probe + ".weight"], src, to)))[: -len(".weight")]
        targets.append(new[len("blocks.0."):] if probe.startswith("blocks.0.") and not t.startswith("blocks.") else new)
    write_adapter_files(dst_dir, renamed, int(config["r"]), float(config["lora_alpha"]), targets)


_TOP_NAMES = {"text_embedding", "time_embedding", "time_projection", "head", "condition_embedder", "proj_out"}


def to_native_adapter(directory: str, tmp_root: str) -> str:
    """`directory` if its module names are native (official Wan), else a native copy under `tmp_root`."""
    from ..models.wan.convert import detect_key_format

    _, tensors = read_adapter_files(directory)
    keys = [(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k).replace(".lora_A.", ".").replace(".lora_B.", ".")
            for k in tensors]
    if detect_key_format(keys) == "official":
        return directory
    out = os.path.join(tmp_root, "native_adapter")
    convert_adapter(directory, out, to="native", src="diffusers")
    return out


def merge_lora_checkpoint(src_path: str, dst: str, to: str, adapter_dir: str, max_shard_size: str | int = "5GB",
                          dtype: str = "keep", state_key: str | None = None, num_heads: int | None = None,
                          progress: bool = True) -> dict:
    """`longlive convert --merge-lora`: base checkpoint (any format) + peft LoRA directory (native or diffusers names)
    -> merged weights in format `to`. Holds the whole state dict in memory (the model is built on the meta device)."""
    import tempfile

    from ..models.wan import WanDiT
    from ..models.wan import checkpoint_io as io
    from ..models.wan.convert import (DTYPES, checkpoint_config, detect_format, load_wan_weights, save_wan_weights,
                                      to_native_state_dict)

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: unknown. Fix: use one of {', '.join(DTYPES)}.")
    src = io.open_checkpoint(src_path, state_key)
    cfg, _ = checkpoint_config(src, detect_format(src), num_heads)
    sd, fmt = to_native_state_dict(src_path, state_key)
    with torch.device("meta"):
        model = WanDiT(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        merged = merge_adapter_into_state_dict(sd, to_native_adapter(adapter_dir, tmp), model)
    target = DTYPES[dtype]
    if target is not None:
        merged = {k: v.to(target) if v.is_floating_point() else v for k, v in merged.items()}
    load_wan_weights(model, merged, assign=True)
    files = save_wan_weights(model, dst, to, max_shard_size, progress)
    return {"source_format": fmt, "format": to, "files": files, "num_tensors": len(merged), "config": cfg.to_dict(),
            "merged_lora": adapter_dir}


def load_with_adapter(model: nn.Module, adapter_dir: str, merge: bool = True, name: str = "fewstep") -> nn.Module:
    """Few-step sampling: put a LoRA file on a loaded base. merge=True folds it into the weights (no adapter cost);
    merge=False keeps it separate and active (switch with `use_adapter(model, None | name)` at run time)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        load_named_adapter(model, name, to_native_adapter(adapter_dir, tmp))
    if merge:
        merge_adapter(model, name)
    else:
        set_active(model, name)
    return model
