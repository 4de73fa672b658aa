"""The training-precision variants that bench_train_step.py times and memory_account.py accounts for, built the
way training builds them (one place, so the benchmark and the memory model describe the same thing).

  bf16            plain linears: fp32 parameters (the master weights) + bf16 autocast on CUDA, AdamW over all
                  parameters — the Trainer's full fine-tune (`train.precision=bf16`).
  fp8             `quant.linear=fp8` through `build_linear_provider` with `quant.fp8_recipe=rowwise` (FP8Linear,
                  current per-token / per-channel scales; modules in `quant.keep_high_precision` stay plain),
                  otherwise as bf16.
  fp8_channel     as fp8 with `quant.fp8_recipe=channel_delayed`, the config default (quant/fp8_channel.py: delayed
                  per-channel scales, one pointwise E4M3 copy of x and of dy, 4 bytes per value to quantize).
  fp8_channel_fast  as fp8_channel with `quant.fp8_fast_accum_backward` (fast accumulation in all three GEMMs: the
                  config default since session 16; fp8_channel sets it off, promoted gradient GEMMs).
  nvfp4_emulated  `quant.linear=nvfp4_emulated` through the provider (NVFP4Linear: the NVFP4 training recipe,
                  exact numerics), otherwise as bf16.
  nvfp4_lora      the memory mode (`quant.packed_base=true`): the model cast to the base dtype (bf16 on CUDA,
                  as `longlive distill` does), every linear outside the keep-list packed to NVFP4
                  (`pack_model`, `quant.weight_2d` blocks) and frozen, then LoRA adapters of rank
                  `train.lora_rank` (in the base dtype) added by the Trainer; AdamW holds only the adapters.
  nvfp4_lora_offload  nvfp4_lora with `train.offload_activations` (and activation checkpointing, which it
                  needs): each block's saved hidden-state input waits for its recompute in pinned host memory
                  (training/offload.py). Same numbers, less activation memory.
"""
from __future__ import annotations

import torch

from megatron_longlive.config import RunConfig
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.quant.nvfp4.packed import pack_model
from megatron_longlive.quant.fp8_ffn import fuse_for_training
from megatron_longlive.quant.providers import build_linear_provider

VARIANTS = ("bf16", "fp8", "fp8_channel", "fp8_channel_fast", "nvfp4_emulated", "nvfp4_lora", "nvfp4_lora_offload")
DEFAULT_LORA_RANK = 16  # DistillConfig.rank: the generator LoRA that runs on the packed base


def variant_tree(variant: str, lora_rank: int = 0) -> dict:
    """Config sections ({"quant": ..., "train": ...}) that select `variant`. lora_rank: LoRA rank of the
    nvfp4_lora adapters (0: DEFAULT_LORA_RANK), or an optional LoRA on the other variants (0: full fine-tune)."""
    if variant not in VARIANTS:
        raise ValueError(f"--quant {variant!r}: unknown variant. Fix: choose from {', '.join(VARIANTS)}")
    if variant in ("nvfp4_lora", "nvfp4_lora_offload"):
        offload = {"offload_activations": True, "activation_checkpointing": True} if variant.endswith("_offload") else {}
        return {"quant": {"linear": "bf16", "packed_base": True},
                "train": {"lora_rank": lora_rank or DEFAULT_LORA_RANK, **offload}}
    if variant in ("fp8_channel", "fp8_channel_fast"):
        return {"quant": {"linear": "fp8", "fp8_recipe": "channel_delayed", "packed_base": False,
                          "fp8_fast_accum_backward": variant == "fp8_channel_fast"},
                "train": {"lora_rank": lora_rank}}
    recipe = {"fp8_recipe": "rowwise"} if variant == "fp8" else {}
    return {"quant": {"linear": variant, "packed_base": False, **recipe}, "train": {"lora_rank": lora_rank}}


def base_dtype(device: torch.device, precision: str) -> torch.dtype:
    """dtype of the frozen packed base's remaining tensors and of its LoRA adapters (bf16 under bf16 on CUDA)."""
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32


def build_variant_model(cfg: RunConfig, device: str | torch.device, seed: int = 0,
                        packed_dtype: torch.dtype | None = None) -> WanDiT:
    """The WanDiT of `cfg` (a config made with `variant_tree`) with Wan's seeded init, on `device`
    ("meta" builds shapes only). packed_dtype: dtype of a packed model (default `base_dtype`). LoRA is not
    applied here: the Trainer applies it from `train.lora_rank`."""
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanDiT(cfg.model, build_linear_provider(cfg.quant))
        fuse_for_training(model, cfg.quant)
    if device.type != "meta":
        model.init_weights()
    if cfg.quant.packed_base:
        model.to(packed_dtype or base_dtype(device, cfg.train.precision))
        for p in model.parameters():
            p.requires_grad_(False)
        if not pack_model(model, keep=cfg.quant.keep_high_precision, block_2d=cfg.quant.weight_2d):
            raise ValueError("quant.packed_base: no linear was packed (all matched quant.keep_high_precision)")
    return model


def count_quantized(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of each low-precision class the model holds (proof that a variant is what it says)."""
    from megatron_longlive.quant.fp8 import FP8Linear
    from megatron_longlive.quant.nvfp4.linear import NVFP4Linear
    from megatron_longlive.quant.nvfp4.packed import PackedNVFP4Linear

    kinds = {"FP8Linear": FP8Linear, "NVFP4Linear": NVFP4Linear, "PackedNVFP4Linear": PackedNVFP4Linear}
    return {k: sum(isinstance(m, cls) for m in model.modules()) for k, cls in kinds.items()}
