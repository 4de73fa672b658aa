"""Packed NVFP4 memory mode: exact forward, byte budget, safetensors round trip, pack_model keep-list."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_longlive.config import preset_config
from megatron_longlive.config.quant import DEFAULT_KEEP
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.quant.nvfp4 import reference as R
from megatron_longlive.quant.nvfp4.packed import (PackedNVFP4Linear, load_packed, pack_model, packed_modules,
                                                  save_packed)


@pytest.mark.parametrize("block_2d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_equals_fake_quantized_weight_forward(block_2d, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(96, 48).to(dtype)
    packed = PackedNVFP4Linear.from_linear(lin, block_2d=block_2d)
    x = torch.randn(3, 5, 96, dtype=dtype)
    w_q = R.fake_quantize(lin.weight.detach(), block_2d=block_2d).to(dtype)
    assert torch.equal(packed(x), F.linear(x, w_q, lin.bias.detach()))
    assert not any(True for _ in packed.parameters())                   # frozen: nothing to train
    xg = x.clone().requires_grad_()
    packed(xg).sum().backward()                                          # gradients still reach the input (LoRA)
    assert torch.equal(xg.grad, torch.ones(3, 5, 48, dtype=dtype) @ w_q)


@pytest.mark.parametrize("k,n", [(1536, 8960), (8960, 1536), (3072, 14336)])
def test_packed_bytes_at_most_0_3x_fp16_for_large_layers(k, n):
    with torch.device("meta"):
        m = PackedNVFP4Linear(k, n, bias=True)
    fp16 = 2 * k * n
    packed = m.packed_bytes()
    assert packed == k * n // 2 + k * n // 16 + 4                       # 4.5 bits/value + one fp32 scale
    assert packed <= 0.3 * fp16
    total = sum(b.numel() * b.element_size() for b in m.buffers())       # incl. the bf16 bias
    assert total <= 0.3 * (fp16 + 2 * n)


def test_safetensors_round_trip_is_bitwise(tmp_path):
    cfg = preset_config("tiny")
    torch.manual_seed(0)
    model = WanDiT(cfg)
    model.init_weights()
    names = pack_model(model, keep=DEFAULT_KEEP)
    path = str(tmp_path / "packed.safetensors")
    save_packed(model, path)
    torch.manual_seed(1)
    fresh = WanDiT(cfg)                                                  # different random init, unpacked
    assert load_packed(fresh, path) == names
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key
    x, t, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([300.0]), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), fresh(x, t, ctx))
    with pytest.raises(ValueError, match="not a packed NVFP4 file"):
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_packed(fresh, str(tmp_path / "other.safetensors"))


def test_pack_model_respects_keep_list_and_shrinks_memory():
    torch.manual_seed(0)
    model = WanDiT(preset_config("tiny"))
    model.init_weights()
    in_blocks = lambda n: ".ffn." in n or ("attn." in n and "norm" not in n)  # noqa: E731  (the packed layers)
    before = sum(p.numel() * 2 for n, p in model.named_parameters() if in_blocks(n))           # fp16 bytes
    names = pack_model(model, keep=DEFAULT_KEEP)
    mods = dict(model.named_modules())
    assert set(names) == {n for n, _ in packed_modules(model)}
    assert len(names) == 2 * 10 and "blocks.0.self_attn.q" in names
    assert type(mods["head.head"]) is nn.Linear and type(mods["time_embedding.0"]) is nn.Linear
    packed_bytes = sum(m.packed_bytes() + m.bias.numel() * 2 for _, m in packed_modules(model))
    assert packed_bytes < 0.35 * before                                 # tiny layers: bias share is larger
    trainable = {n for n, p in model.named_parameters()}
    assert not any(n.startswith("blocks.0.self_attn.q.") for n in trainable)


def test_lora_trains_on_top_of_packed_base():
    """Memory mode: the project's LoRA wraps packed layers; only the adapters get gradients and move."""
    from megatron_longlive.training.lora import apply_lora, lora_modules

    torch.manual_seed(0)
    model = WanDiT(preset_config("tiny"))
    model.init_weights()
    nn.init.normal_(model.head.head.weight, std=0.02)      # Wan's zero head would block every gradient
    pack_model(model, keep=DEFAULT_KEEP)
    wrapped = apply_lora(model, ["self_attn.q", "self_attn.v", "ffn.0"], rank=4)
    assert all(isinstance(m.base_layer, PackedNVFP4Linear) for m in lora_modules(model).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(wrapped)
    codes_before = {n: m.codes.clone() for n, m in packed_modules(model)}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, t, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([300.0]), torch.randn(1, 16, 32)
    target = torch.randn(1, 16, 1, 8, 8)
    losses = []
    for _ in range(3):
        loss = (model(x, t, ctx) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(codes_before[n], m.codes) for n, m in packed_modules(model))
