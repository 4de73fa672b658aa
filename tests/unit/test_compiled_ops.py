"""train.compile_elementwise: the DiT's elementwise chains run through torch.compile (models/compiled_ops.py).

Tier (c): every chain compiled on the CPU (Inductor's C++ backend) against its eager form, forward and every input
gradient, on bf16 activations with float32 modulation/gate/weights: bf16 results within one unit in the last place
(measured on the CPU: all bitwise but 0.1% of two input gradients, 0.7 ulp), float32 sums over tokens within 1e-5
(reduction order). Inductor keeps eager's intermediate bf16 roundings (`emulate_precision_casts`; without it 29%
of norm_modulate's outputs moved). The tiny WanDiT trains through them tracking the eager run; the switch follows
the config and is bypassed inside an outer compile.
"""
from __future__ import annotations

import copy

import pytest
import torch

from megatron_longlive.models import compiled_ops
from megatron_longlive.models.provider import RMSNorm
from megatron_longlive.models.wan import model as wan
from megatron_longlive.models.wan.rope import apply_rope

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def compiled():
    torch._dynamo.reset()
    compiled_ops.enable(True)
    yield
    compiled_ops.enable(False)


def _chains(b=2, f=3, per=8, d=32, heads=2, device="cpu"):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(device, dt)  # noqa: E731
    x, y = r(b, f * per, d), r(b, f * per, d)
    shift, scale, gate = (r(b, f, d, dt=torch.float32) * 0.3 for _ in range(3))
    ln = wan.FP32LayerNorm(d, 1e-6, elementwise_affine=False)
    ln_affine = wan.FP32LayerNorm(d, 1e-6, elementwise_affine=True)
    rms = RMSNorm(d, 1e-6)
    ln, ln_affine, rms = (m.to(device) for m in (ln, ln_affine, rms))
    with torch.no_grad():
        for p in (*ln_affine.parameters(), rms.weight):
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    ang = torch.rand(f * per, d // heads // 2, generator=g, dtype=torch.float64).to(device) * 6
    cos, sin = ang.cos(), ang.sin()
    return {"norm_modulate": (lambda x, sh, sc: wan.norm_modulate(ln, x, sh, sc), (x, shift, scale)),
            "layer_norm_affine": (ln_affine, (x,)),
            "gated_residual": (wan.gated_residual, (x, y, gate)),
            "rms_norm": (rms, (x,)),
            "rope": (lambda q: apply_rope(q, cos, sin), (x.unflatten(-1, (heads, -1)),))}


def _run(fn, args):
    args = [a.detach().clone().requires_grad_() for a in args]
    module = fn if isinstance(fn, torch.nn.Module) else None
    if module is not None:
        module.zero_grad(set_to_none=True)
    out = fn(*args)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype))
    params = [p.grad for p in module.parameters()] if module is not None else []
    return [out, *(a.grad for a in args), *params]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in units of the last place of b's dtype at |b| (bf16: 2**-7 relative, fp32: 2**-23)."""
    eps = torch.finfo(b.dtype).eps
    scale = b.abs().float().clamp_min(torch.finfo(b.dtype).tiny) * eps
    return ((a.float() - b.float()).abs() / scale).max().item()


@pytest.mark.parametrize("name", ["norm_modulate", "layer_norm_affine", "gated_residual", "rms_norm", "rope"])
def test_compiled_chain_matches_eager(name, compiled):
    fn, args = _chains()[name]
    got = _run(fn, args)
    compiled_ops.enable(False)
    want = _run(fn, args)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
        if b.dtype == torch.bfloat16:                   # activations and their gradients
            assert _ulps(a, b) <= 1.0, (name, i, _ulps(a, b))
        else:                                           # float32 sums over tokens (weight, shift/scale/gate grads)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item()), (name, i)
    assert got[0].abs().max() > 0.1


def test_compiled_path_really_compiles(compiled):
    """The switch reaches torch.compile (a graph is produced) and is bypassed under an outer compile."""
    from torch._dynamo.utils import counters

    counters.clear()
    x = torch.randn(2, 6, 16)
    wan.layer_norm_fp32(x, eps=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1
    seen = []
    orig = wan.layer_norm_fp32.eager

    @torch.compile(backend="eager")
    def outer(t):
        seen.append(torch.compiler.is_compiling())
        return wan.layer_norm_fp32(t, eps=1e-6)

    assert torch.allclose(outer(x), orig(x, eps=1e-6)) and seen == [True]


def test_tiny_wan_trains_compiled_tracking_eager(compiled):
    """4 AdamW steps of the tiny WanDiT (float32) with every elementwise chain compiled vs eager: losses agree to
    1e-5 relative (fp32 reduction order only)."""
    from bench.bench_nvfp4 import tiny_training_losses
    from megatron_longlive.config import QuantConfig

    got = tiny_training_losses(QuantConfig(linear="bf16"), 4)
    compiled_ops.enable(False)
    want = tiny_training_losses(QuantConfig(linear="bf16"), 4)
    assert max(abs(a - b) / b for a, b in zip(got, want)) < 1e-5, (got, want)
    assert got[-1] < got[0]


def test_config_switch(tmp_path):
    from megatron_longlive.config import build_config
    from megatron_longlive.training.trainer import apply_memory_options

    for mode, device, want in (("on", "cpu", True), ("auto", "cpu", False), ("off", "cpu", False),
                               ("auto", "cuda", True)):
        cfg = build_config({"train": {"compile_elementwise": mode}})
        try:
            apply_memory_options(torch.nn.Module(), cfg.train, torch.device(device))
            assert compiled_ops.enabled() is want, (mode, device)
        finally:
            compiled_ops.enable(False)
    with pytest.raises(ValueError, match="compile_elementwise"):
        build_config({"train": {"compile_elementwise": "yes"}})
