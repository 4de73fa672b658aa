"""The float32 norms keep only their inputs as given for backward (models/save_inputs.py) and stay bit for bit
equal to the plain-autograd norms they replaced (kept here as the reference): outputs, input and weight
gradients for float32 and bf16 inputs, with and without bf16 autocast, and a whole tiny training step."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_longlive.models.provider import RMSNorm
from megatron_longlive.models.save_inputs import save_inputs
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.models.wan import model as wan_model
from megatron_longlive.models.wan.model import FP32LayerNorm
from megatron_longlive.training.teacher_forcing import teacher_forcing_loss
from megatron_longlive.training.trainer import apply_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_layer_norm(self, x):   # the implementation before save_inputs (plain autograd)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    w = self.weight.to(xf.dtype) if self.weight is not None else None
    b = self.bias.to(xf.dtype) if self.bias is not None else None
    return F.layer_norm(xf, self.normalized_shape, w, b, self.eps).type_as(x)


def reference_rms_norm(self, x):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def reference_norm_modulate(norm, x, shift, scale):
    return wan_model.modulate(norm(x), shift, scale)


def reference_gated_residual(x, y, gate):
    b, s, d = x.shape
    hi = wan_model.hi
    out = hi(x).view(b, gate.shape[1], -1, d) + hi(y).view(b, gate.shape[1], -1, d) * gate[:, :, None]
    return out.view(b, s, d).type_as(x)


@contextlib.contextmanager
def reference_norms():
    saved = (FP32LayerNorm.forward, RMSNorm.forward, wan_model.norm_modulate, wan_model.gated_residual)
    FP32LayerNorm.forward, RMSNorm.forward = reference_layer_norm, reference_rms_norm
    wan_model.norm_modulate, wan_model.gated_residual = reference_norm_modulate, reference_gated_residual
    try:
        yield
    finally:
        FP32LayerNorm.forward, RMSNorm.forward, wan_model.norm_modulate, wan_model.gated_residual = saved


def _norms(dim=48):
    torch.manual_seed(0)
    out = {"ln": FP32LayerNorm(dim, 1e-6, elementwise_affine=False),
           "ln_affine": FP32LayerNorm(dim, 1e-6, elementwise_affine=True),
           "ln_weight_only": FP32LayerNorm(dim, 1e-6, elementwise_affine=True, bias=False),
           "rms": RMSNorm(dim, 1e-6)}
    with torch.no_grad():
        for m in out.values():
            for p in m.parameters():
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return out


def _run(norm, x, grad, autocast):
    x = x.detach().requires_grad_()
    for p in norm.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
    y.backward(grad.to(y.dtype))
    return [y, x.grad, *(p.grad for p in norm.parameters())]


@pytest.mark.parametrize("name", ["ln", "ln_affine", "ln_weight_only", "rms"])
@pytest.mark.parametrize("dtype,param_dtype,autocast", [(torch.float32, torch.float32, False),
                                                        (torch.bfloat16, torch.float32, False),
                                                        (torch.bfloat16, torch.bfloat16, False),
                                                        (torch.float32, torch.float32, True),
                                                        (torch.bfloat16, torch.float32, True)])
def test_norm_outputs_and_gradients_equal_plain_autograd_bitwise(name, dtype, param_dtype, autocast):
    norm = _norms()[name].to(param_dtype)
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(2, 7, 48, generator=g) + 0.5).to(dtype)
    grad = torch.randn(2, 7, 48, generator=g)
    new = _run(norm, x, grad, autocast)
    with reference_norms():
        ref = _run(norm, x, grad, autocast)
    assert len(new) == len(ref) == 2 + len(list(norm.parameters()))
    for a, b in zip(new, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_norm_matches_float64_math():
    norm = _norms()["ln_affine"]
    x = torch.randn(3, 48, dtype=torch.float64)
    expect = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expect = expect * norm.weight.double() + norm.bias.double()
    assert torch.allclose(norm(x.bfloat16().float().requires_grad_()).double(),
                          F.layer_norm(x.bfloat16().double(), (48,), norm.weight.double(), norm.bias.double(),
                                       1e-6), atol=1e-5)
    assert torch.allclose(norm(x.float()).double(), expect, atol=1e-5)


@pytest.mark.parametrize("name", ["ln_affine", "rms"])
def test_backward_keeps_only_the_input_as_given(name):
    norm = _norms()[name]
    x = torch.randn(4, 48).bfloat16().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        norm(x)
    params = {p.data_ptr() for p in norm.parameters()}
    activations = [t for t in kept if t.data_ptr() not in params]
    assert len(activations) == 1 and activations[0].dtype == torch.bfloat16
    assert activations[0].data_ptr() == x.data_ptr()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t), reference_norms():
        kept.clear()
        norm(x)
    assert any(t.dtype == torch.float32 and t.shape == x.shape for t in kept)   # what the old norm kept


@pytest.mark.parametrize("op", ["norm_modulate", "gated_residual"])
def test_modulation_ops_keep_no_float32_copy_of_tokens(op):
    """With trained shift/scale/gate, plain autograd keeps [B, S, D] float32 copies; these keep bf16 inputs."""
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(2, 12, 48, generator=g).bfloat16().requires_grad_() for _ in range(2))
    a, b = (torch.randn(2, 3, 48, generator=g).requires_grad_() for _ in range(2))
    norm = FP32LayerNorm(48, 1e-6, elementwise_affine=False)
    new = getattr(wan_model, op)
    ref = reference_norm_modulate if op == "norm_modulate" else reference_gated_residual
    args = (norm, x, a, b) if op == "norm_modulate" else (x, y, a)
    for fn, fp32_copies in ((new, 0), (ref, 1)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn(*args)
        big = [t for t in kept if t.numel() == x.numel()]
        assert sum(t.dtype == torch.float32 for t in big) >= fp32_copies
        assert fp32_copies or all(t.dtype == torch.bfloat16 for t in big)


def test_no_grad_calls_the_plain_ops():
    norm = _norms()["rms"]
    x = torch.randn(4, 48, requires_grad=True)
    with torch.no_grad():
        y = norm(x)
    assert y.grad_fn is None
    assert norm(x).grad_fn.name().endswith("_SaveInputsBackward")


def _train_step(model, latents, text):
    for p in model.parameters():
        p.grad = None
    with torch.autocast(latents.device.type, dtype=torch.bfloat16):
        loss, _ = teacher_forcing_loss(model, latents, text, 1, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointed,frozen", [(False, False), (True, False), (True, True)])
def test_tiny_training_step_is_bitwise_unchanged(tiny_cfg, checkpointed, frozen):
    """Full fine-tune (trained modulation: norm_modulate and gated_residual take save_inputs) and a frozen
    base with trained linears (as LoRA: plain gated_residual), with and without activation checkpointing."""
    torch.manual_seed(0)
    model = WanDiT(tiny_cfg)
    model.init_weights()
    if checkpointed:
        apply_activation_checkpointing(model)
    if frozen:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("blocks.") and n.endswith(".weight") and "norm" not in n
                             and "modulation" not in n)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, tiny_cfg.in_channels, 2, 16, 16, generator=g)
    text = torch.randn(1, tiny_cfg.text_len, tiny_cfg.text_dim, generator=g)
    loss, grads = _train_step(model, latents, text)
    with reference_norms():
        ref_loss, ref_grads = _train_step(model, latents, text)
    assert torch.isfinite(loss) and torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    differ = [n for n in grads if not torch.equal(grads[n], ref_grads[n])]
    assert not differ, differ
    assert grads and all(grads[n].abs().sum() > 0 for n in grads)


@pytest.mark.parametrize("forward_autocast", [False, True])
def test_backward_recomputes_under_the_forwards_autocast_state(forward_autocast):
    """The recompute runs under the forward's autocast state, not the one around .backward() (a matmul, which
    CPU autocast lowers to bf16, shows the difference; the norms' element-wise ops are autocast-neutral)."""
    g = torch.Generator().manual_seed(5)
    x, w, grad = torch.randn(6, 32, generator=g), torch.randn(32, 16, generator=g), torch.randn(6, 16, generator=g)
    got = []
    for fn in (lambda x, w: save_inputs(torch.matmul, x, w), torch.matmul):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
            y = fn(xr, wr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not forward_autocast):
            y.backward(grad.to(y.dtype))
        got.append((y, xr.grad, wr.grad))
    for a, b in zip(*got):
        assert a.dtype == b.dtype and torch.equal(a, b)
