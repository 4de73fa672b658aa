"""Packed NVFP4 base + LoRA: what one linear saves for backward (no dequantized weight copy), and that the
packed linear's autograd Function gives the same outputs and gradients as a plain F.linear on the
dequantized weight (the previous implementation), with and without bf16 autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_longlive.quant.nvfp4.packed import PackedNVFP4Linear
from megatron_longlive.training.lora import LoRALinear


def _layer(dtype, in_f=64, out_f=96, rank=4):
    torch.manual_seed(0)
    lora = LoRALinear(PackedNVFP4Linear.from_linear(nn.Linear(in_f, out_f).to(dtype), block_2d=True), rank, 8.0)
    nn.init.normal_(lora.lora_B.weight)                 # non-zero B so grads flow through both adapters
    return lora


def _plain_forward(lora, x):
    """The previous packed forward: F.linear on the dequantized weight (autograd saves that weight)."""
    base = lora.base_layer
    w = base.dequantized_weight(x.dtype)
    y = F.linear(x, w, base.bias.to(x.dtype))
    return y + lora.lora_B(lora.lora_A(x)) * lora.scaling


def _saved(fn, owned):
    """Bytes of distinct storages autograd saves while running fn(), excluding `owned` (module state)."""
    seen, sizes = set(), []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.data_ptr() not in owned:
            seen.add(s.data_ptr())
            sizes.append((tuple(t.shape), s.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.float32, True), (torch.bfloat16, True)])
def test_packed_lora_matches_plain_linear(dtype, autocast):
    lora = _layer(dtype)
    x0 = torch.randn(2, 7, 64, dtype=dtype)
    results = []
    for fwd in (lambda x: lora(x), lambda x: _plain_forward(lora, x)):
        x = x0.clone().requires_grad_()
        lora.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fwd(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad, lora.lora_A.weight.grad, lora.lora_B.weight.grad))
    for i, (new, old) in enumerate(zip(*results)):
        assert new.dtype == old.dtype
        if i == 1 and autocast and dtype == torch.float32:
            # fp32 x under bf16 autocast: the old path shared autocast's cached bf16 cast of x between base and
            # lora_A, so the two input grads were summed in bf16; now they are summed in fp32 (bf16-level change)
            torch.testing.assert_close(new, old, rtol=2 ** -7, atol=2 ** -7)
            continue
        torch.testing.assert_close(new.float(), old.float(), rtol=0, atol=1e-6 if new.dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_lora_saves_no_dequantized_weight(dtype):
    lora = _layer(dtype)
    owned = {t.untyped_storage().data_ptr() for t in list(lora.parameters()) + list(lora.buffers())}
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    _, new = _saved(lambda: lora(x), owned)
    esz = x.element_size()
    # exactly: x (for dA) and x A^T (for dB), nothing of [out, in] size
    assert sorted(b for _, b in new) == [3 * 5 * 4 * esz, 3 * 5 * 64 * esz], new
    # the previous F.linear path saved the dequantized [out, in] weight in addition (the test can fail)
    _, old = _saved(lambda: _plain_forward(lora, x), owned)
    assert sum(b for _, b in old) - sum(b for _, b in new) == 96 * 64 * esz


def test_packed_linear_without_input_grad_saves_nothing_new():
    base = _layer(torch.bfloat16).base_layer
    owned = {t.untyped_storage().data_ptr() for t in base.buffers()}
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _saved(lambda: base(x), owned)
    assert saved == [] and y.requires_grad
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 96, dtype=torch.bfloat16) @ base.dequantized_weight(torch.bfloat16))
