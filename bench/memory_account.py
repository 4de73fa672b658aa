"""Training-state memory account (a MODEL, not a measurement): weights, gradients and AdamW states of each
training-precision variant (bench/train_variants.py), bf16 full fine-tune vs the NVFP4-packed base + LoRA.

The model is built on the meta device with the real module classes (providers, PackedNVFP4Linear, LoRALinear),
so every byte comes from a real parameter / buffer shape and dtype. Assumptions, as training/trainer.py does it:
  * full fine-tune (bf16, fp8, nvfp4_emulated): the parameters are fp32 and are the master weights (no separate
    copy); `train.precision=bf16` is autocast, whose bf16 weight casts live only during forward/backward and are
    counted with the activations, not here. Gradients have the parameter dtype (fp32).
  * nvfp4_lora: the base is cast to bf16 (as `longlive distill` on CUDA) and frozen: packed linears keep codes
    (uint8, 2 values/byte), E4M3 block scales, an fp32 tensor scale and the bf16 bias as buffers; modules in
    `quant.keep_high_precision`, norms and modulation stay bf16 parameters without gradients. LoRA adapters
    (rank `--rank`, `train.lora_targets`) are bf16, and so are their gradients and AdamW states.
  * torch.optim.AdamW (not fused, not capturable): exp_avg and exp_avg_sq in the parameter dtype, plus one fp32
    scalar `step` per parameter tensor (host memory on CUDA).
  * not counted: activations (measure them with bench_train_step.py, whose peak includes them), EMA
    (`train.ema_decay=0` by default), the CUDA context and allocator slack.
The tests check this account byte for byte against the real tiny model after one Trainer step
(`measured_state_bytes`).

  python bench/memory_account.py --preset wan2.1-1.3b --out bench/results.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from bench.train_variants import VARIANTS, build_variant_model, variant_tree  # noqa: E402
from megatron_longlive.config import RunConfig, build_config  # noqa: E402
from megatron_longlive.training.lora import apply_lora  # noqa: E402

CATEGORIES = ("trainable_weights", "frozen_weights", "gradients", "adamw_moments", "adamw_step")
STEP_BYTES = 4  # AdamW's per-tensor `step`: a float32 scalar


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def account(model: nn.Module) -> dict[str, int]:
    """Bytes per category for training `model` (any device, meta included) with AdamW over its trainable
    parameters, by the rules in the module docstring."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    out = {"trainable_weights": sum(map(_nbytes, trainable)), "frozen_weights": sum(map(_nbytes, frozen))}
    out["gradients"] = out["trainable_weights"]
    out["adamw_moments"] = 2 * out["trainable_weights"]
    out["adamw_step"] = STEP_BYTES * len(trainable)
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The same categories from the real tensors: parameters, buffers, `.grad`s and the optimizer's state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    moments = steps = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                if key == "step":
                    steps += _nbytes(value)
                else:
                    moments += _nbytes(value)
    out = {"trainable_weights": sum(map(_nbytes, trainable)), "frozen_weights": sum(map(_nbytes, frozen)),
           "gradients": sum(_nbytes(p.grad) for p in trainable if p.grad is not None),
           "adamw_moments": moments, "adamw_step": steps}
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def variant_config(preset: str, variant: str, lora_rank: int = 0) -> RunConfig:
    tree = variant_tree(variant, lora_rank)
    return build_config({"model": {"preset": preset}, "quant": tree["quant"],
                         "train": {**tree["train"], "precision": "bf16", "wandb_mode": "disabled"}})


def meta_model(cfg: RunConfig, packed_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The training model of `cfg` on the meta device, LoRA applied as the Trainer applies it."""
    model = build_variant_model(cfg, "meta", packed_dtype=packed_dtype)
    if cfg.train.lora_rank > 0:
        apply_lora(model, cfg.train.lora_targets, cfg.train.lora_rank, cfg.train.lora_alpha)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--rank", type=int, default=0, help="LoRA rank of nvfp4_lora (0: the default, 16)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=None, help="append JSON lines here (bench/record.py)")
    a = p.parse_args(argv)
    rows = {}
    for v in a.variants:
        cfg = variant_config(a.preset, v, a.rank if v == "nvfp4_lora" else 0)
        rows[v] = (account(meta_model(cfg)), cfg.train.lora_rank)
    base = rows.get("bf16", (None,))[0]
    gib = 2 ** 30
    unit, scale = ("GiB", gib) if max(acc["total"] for acc, _ in rows.values()) >= gib else ("MiB", 2 ** 20)
    print(f"Training-state memory MODEL (not a measurement), {a.preset}, in {unit}; activations not included")
    print(f"{'variant':<22}" + "".join(f"{c:>19}" for c in CATEGORIES) + f"{'total':>11}{'x bf16':>8}")
    for v, (acc, rank) in rows.items():
        label = f"{v} r{rank}" if rank else v
        ratio = acc["total"] / base["total"] if base else float("nan")
        print(f"{label:<22}" + "".join(f"{acc[c] / scale:>19.3f}" for c in CATEGORIES)
              + f"{acc['total'] / scale:>11.3f}{ratio:>8.3f}")
        name = f"{a.preset} training-state memory model (account, not a measurement) {label}"
        record(a.out, name, "state_memory", round(acc["total"] / gib, 4), "GiB", kind="model",
               bytes={c: acc[c] for c in CATEGORIES}, **({"ratio_to_bf16": round(ratio, 4)} if base else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
