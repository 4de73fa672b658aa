"""LoRA adapters applied from outside the model, saved in peft's file format.

`apply_lora(model, targets, rank, alpha)` freezes the model and wraps every module whose name ends
with one of `targets` (e.g. "self_attn.q", "ffn.0") in `LoRALinear`: y = base(x) + B(A(x)) * alpha/r,
A Kaiming-uniform and B zero as in peft, so training starts from the base model. The wrapper mirrors
peft's layout (`base_layer`, `lora_A`, `lora_B`), and `save_adapter` writes `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` plus `adapter_config.json`, which
`peft.PeftModel.from_pretrained` loads. `merge_lora` folds adapters into plain linears for inference.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update. base_layer: any module with in/out_features."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def peft_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of the whole layer as peft stores them (TP subclasses gather their shards)."""
        return self.lora_A.weight.detach(), self.lora_B.weight.detach()

    @torch.no_grad()
    def load_peft_weights(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy the whole-layer (A, B) in (TP subclasses keep their shard)."""
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_linear(m: nn.Module) -> bool:
    """nn.Linear-like (in_features) or a megatron-core parallel linear (input_size / output_size)."""
    return hasattr(m, "in_features") or (hasattr(m, "input_size") and hasattr(m, "output_size"))


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float = 0.0, wrap=None) -> list[str]:
    """Freeze `model` and wrap target linears in place. Returns the wrapped module names.

    wrap(module, rank, alpha) builds the wrapper (default `LoRALinear`; TP models: `distributed.tp_lora`)."""
    alpha = alpha or float(rank)
    wrap = wrap or LoRALinear
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if _matches(n, targets) and _is_linear(m)]
    if not names:
        raise ValueError(f"train.lora_targets={targets} matched no linear module. "
                         f"Fix: use module-name suffixes such as 'self_attn.q' or 'ffn.0'.")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrap(getattr(parent, child), rank, alpha))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft-named adapter tensors: base_model.model.<module>.lora_{A,B}.weight (whole layers: under TP a
    collective that every rank calls)."""
    out = {}
    for name, m in lora_modules(model).items():
        a, b = m.peft_weights()
        out[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    return out


def write_adapter_files(directory: str, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                        targets: list[str]) -> None:
    """Write peft's LoRA files: adapter_model.safetensors (the given peft-named tensors) + adapter_config.json."""
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(directory, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "base_model_name_or_path": None, "inference_mode": True}
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def resolve_adapter_dir(path: str) -> str:
    """The peft adapter directory `path` names: itself, its `generator/` (one distill step), or the newest
    `step_*/generator/` of a `longlive distill` output directory. FileNotFoundError with the fix otherwise."""
    def has_adapter(d: str) -> bool:
        return os.path.isfile(os.path.join(d, ADAPTER_CONFIG))

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory. Fix: pass an adapter directory (adapter_config.json + "
                                f"{ADAPTER_WEIGHTS}) or a `longlive distill` output directory.")
    if has_adapter(path):
        return path
    if has_adapter(os.path.join(path, "generator")):
        return os.path.join(path, "generator")
    steps = sorted(d for d in os.listdir(path) if d.startswith("step_") and has_adapter(os.path.join(path, d, "generator")))
    if steps:
        return os.path.join(path, steps[-1], "generator")
    raise FileNotFoundError(f"{path}: no LoRA adapter here ({ADAPTER_CONFIG} in it, in generator/, or in "
                            f"step_*/generator/). Fix: point at the adapter written by `longlive distill` or by peft's "
                            f"save_pretrained.")


def read_adapter_files(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, adapter tensors) of a peft LoRA directory; clear error if a file is missing."""
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cfg_path, w_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: LoRA adapter file missing. Fix: point at a directory written by "
                                    f"save_adapter or peft's save_pretrained.")
    with open(cfg_path) as f:
        config = json.load(f)
    return config, load_file(w_path)


def save_adapter(model: nn.Module, directory: str, targets: list[str] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json (peft's LoRA format). tensors: `adapter_state_dict`
    computed beforehand (under TP it is collective, while only one rank writes)."""
    mods = lora_modules(model)
    assert mods, "save_adapter: the model has no LoRA modules"
    first = next(iter(mods.values()))
    tensors = adapter_state_dict(model) if tensors is None else tensors
    write_adapter_files(directory, tensors, first.rank, first.alpha, targets or list(mods))


def load_adapter(model: nn.Module, directory: str) -> None:
    """Load a peft LoRA adapter into a model (wrapping its target modules first if needed)."""
    config, tensors = read_adapter_files(directory)
    w_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not lora_modules(model):
        apply_lora(model, list(config["target_modules"]), int(config["r"]), float(config["lora_alpha"]))
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{w_path}: adapter keys do not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}). Fix: load the adapter into the model it was trained on.")
    for name, m in lora_modules(model).items():
        m.load_peft_weights(tensors[f"base_model.model.{name}.lora_A.weight"],
                            tensors[f"base_model.model.{name}.lora_B.weight"])


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold W += scaling * B @ A into each base linear and unwrap (no adapter cost at inference)."""
    for name, m in lora_modules(model).items():
        base = m.base_layer
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling
        base.weight.add_(delta.to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
