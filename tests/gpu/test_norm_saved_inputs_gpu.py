"""models/save_inputs.py on CUDA: the norms and modulation ops give bit for bit the outputs and gradients of the
plain-autograd versions (tests/unit/test_norm_saved_inputs.py keeps them) under bf16 autocast at the 1.3B width,
keep less memory between forward and backward, and a tiny training step is unchanged (bitwise where the
reference step is itself run-to-run deterministic on this GPU; otherwise to its own noise)."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.gpu_helpers import bytes_differ, tiny_cuda_dit
from tests.unit.test_norm_saved_inputs import (_train_step, reference_gated_residual, reference_norm_modulate,
                                               reference_norms)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

S, D, F = 8192, 1536, 4


def _ops():
    from megatron_longlive.models.provider import RMSNorm
    from megatron_longlive.models.wan import model as wan

    torch.manual_seed(0)
    ln = wan.FP32LayerNorm(D, 1e-6, elementwise_affine=True).cuda()
    ln_plain = wan.FP32LayerNorm(D, 1e-6, elementwise_affine=False).cuda()
    rms = RMSNorm(D, 1e-6).cuda()
    with torch.no_grad():
        for p in [*ln.parameters(), *rms.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return {"norm3 (LayerNorm, affine)": (ln, lambda x, a, b: ln(x), None),
            "q/k RMSNorm": (rms, lambda x, a, b: rms(x), None),
            "norm_modulate": (ln_plain, lambda x, a, b: wan.norm_modulate(ln_plain, x, a, b),
                              lambda x, a, b: reference_norm_modulate(ln_plain, x, a, b)),
            "gated_residual": (None, lambda x, a, b: wan.gated_residual(x, x * 0.5, a),
                               lambda x, a, b: reference_gated_residual(x, x * 0.5, a))}


def _run(fn, module, x, a, b, grad):
    x, a, b = (t.detach().requires_grad_() for t in (x, a, b))
    for p in (module.parameters() if module is not None else ()):
        p.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fn(x, a, b)
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    y.backward(grad.to(y.dtype))
    params = [p.grad for p in module.parameters()] if module is not None else []
    return [y.detach(), x.grad, a.grad, b.grad, *params], kept


def test_ops_bitwise_and_smaller_on_cuda():
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
    a, b = (0.1 * torch.randn(1, F, D, device="cuda", generator=g) for _ in range(2))
    grad = torch.randn(1, S, D, device="cuda", generator=g)
    rows = []
    for name, (module, fn, ref_fn) in _ops().items():
        new, kept_new = _run(fn, module, x, a, b, grad)
        with reference_norms():
            ref, kept_ref = _run(ref_fn or fn, module, x, a, b, grad)
        for got, want in zip(new, ref):
            assert (got is None) == (want is None)
            if got is not None:
                assert got.dtype == want.dtype and torch.equal(got, want), f"{name}: {bytes_differ(got, want)}"
        rows.append((name, kept_ref / S, kept_new / S))
        assert kept_new < kept_ref, name
    print(f"\n{'op (bf16 autocast, D=1536)':<30}{'kept B/token before':>22}{'after':>10}")
    for name, before, after in rows:
        print(f"{name:<30}{before:>22.0f}{after:>10.0f}")


def test_tiny_training_step_unchanged_on_cuda():
    from megatron_longlive.config import preset_config

    model, m = tiny_cuda_dit().train(), preset_config("tiny")
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, m.in_channels, 2, 16, 16, generator=g).cuda()
    text = torch.randn(1, m.text_len, m.text_dim, generator=g).cuda()
    loss, grads = _train_step(model, latents, text)
    with reference_norms():
        ref_loss, ref_grads = _train_step(model, latents, text)
        ref_loss2, ref_grads2 = _train_step(model, latents, text)
    deterministic = torch.equal(ref_loss, ref_loss2) and all(torch.equal(ref_grads[n], ref_grads2[n])
                                                            for n in ref_grads)
    if deterministic:
        assert torch.equal(loss, ref_loss)
        differ = {n: bytes_differ(grads[n], ref_grads[n]) for n in grads if not torch.equal(grads[n], ref_grads[n])}
        assert not differ, differ
    else:   # e.g. attention backward with atomics: compare to the reference's own run-to-run noise
        noise = max((ref_grads[n] - ref_grads2[n]).abs().max().item() for n in ref_grads)
        worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
        assert worst <= 4 * noise, (worst, noise)
    print(f"\ntiny CUDA step: reference deterministic={deterministic}, loss {loss.item():.6f} vs {ref_loss.item():.6f}")
