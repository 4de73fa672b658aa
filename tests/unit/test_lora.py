"""LoRA: starts at the base model, trains only adapters, round-trips through peft's loader."""
from __future__ import annotations

import json

import torch
from torch import nn

from megatron_longlive.training.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, apply_lora, load_adapter,
                                             merge_lora, save_adapter)

TARGETS = ["self_attn.q", "self_attn.v", "ffn.0", "ffn.2"]


class TinyNet(nn.Module):
    """A small torch module with Wan-like module names (blocks.i.self_attn.q, blocks.i.ffn.0, ...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.self_attn = nn.Module()
            for n in "qkv":
                setattr(blk.self_attn, n, nn.Linear(8, 8))
            blk.ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            self.blocks.append(blk)

    def forward(self, x):
        for blk in self.blocks:
            a = blk.self_attn
            x = x + a.v(torch.tanh(a.q(x)) * a.k(x))
            x = x + blk.ffn(x)
        return x


def _randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_lora_starts_at_base_and_freezes_base():
    model, ref = TinyNet(), TinyNet()
    x = torch.randn(3, 8)
    names = apply_lora(model, TARGETS, rank=4, alpha=8)
    assert len(names) == 8 and "blocks.0.self_attn.k" not in names
    assert torch.equal(model(x), ref(x))  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_adapter_files_load_in_peft_with_identical_outputs(tmp_path):
    from peft import PeftModel

    model = TinyNet()
    apply_lora(model, TARGETS, rank=4, alpha=8)
    _randomize_adapters(model)
    save_adapter(model, str(tmp_path), TARGETS)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / ADAPTER_WEIGHTS)))
    assert "base_model.model.blocks.0.self_attn.q.lora_A.weight" in keys and len(keys) == 16

    peft_model = PeftModel.from_pretrained(TinyNet(), str(tmp_path))
    x = torch.randn(5, 8)
    ours, theirs = model(x), peft_model(x)
    assert not torch.allclose(ours, TinyNet()(x))  # the adapters do something
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)

    # and back: peft's own save loads into our wrapper
    peft_model.save_pretrained(str(tmp_path / "peft"))
    mine = TinyNet()
    load_adapter(mine, str(tmp_path / "peft"))
    assert torch.allclose(mine(x), theirs, rtol=0, atol=1e-6)


def test_merge_matches_unmerged(tiny_model):
    x = torch.randn(1, 16, 2, 8, 8)
    t, ctx = torch.tensor([500.0]), torch.randn(1, 16, 32)
    apply_lora(tiny_model, ["self_attn.q", "cross_attn.o", "ffn.2"], rank=2)
    _randomize_adapters(tiny_model)
    with torch.no_grad():
        before = tiny_model(x, t, ctx)
        merge_lora(tiny_model)
        after = tiny_model(x, t, ctx)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    assert torch.allclose(before, after, atol=1e-5)
