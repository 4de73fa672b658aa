"""`longlive train` honours quant.*: quant.linear picks the training linears (it used to be ignored silently),
quant.packed_base packs and freezes the base for LoRA, and bad combinations are refused with a fix."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import load_config
from megatron_longlive.quant.fp8 import FP8Linear
from megatron_longlive.quant.nvfp4.linear import NVFP4Linear
from megatron_longlive.quant.nvfp4.packed import PackedNVFP4Linear
from megatron_longlive.training.trainer import build_model


@pytest.mark.parametrize("linear, cls", [("fp8", FP8Linear), ("nvfp4_emulated", NVFP4Linear)])
def test_quant_linear_selects_the_training_linears(linear, cls):
    cfg = load_config(None, [f"quant.linear={linear}"])
    model = build_model(cfg)
    n = sum(isinstance(m, cls) for m in model.modules())
    assert n > 0 and n == sum(type(m).__name__ == cls.__name__ for m in model.blocks.modules())  # head etc. kept
    plain = build_model(load_config())
    assert not any(isinstance(m, (FP8Linear, NVFP4Linear)) for m in plain.modules())
    # the same seeded weights: only the GEMM precision changes
    assert torch.equal(model.blocks[0].self_attn.q.weight, plain.blocks[0].self_attn.q.weight)


def test_packed_base_packs_and_freezes_and_needs_lora():
    with pytest.raises(ValueError, match="train.lora_rank > 0"):
        build_model(load_config(None, ["quant.packed_base=true"]))
    model = build_model(load_config(None, ["quant.packed_base=true", "train.lora_rank=4"]))
    assert any(isinstance(m, PackedNVFP4Linear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
