"""train.compile_elementwise: the DiT's elementwise chains run through torch.compile (models/compiled_ops.py).

Tier (c): every chain compiled on the CPU (Inductor's C++ backend) and its eager form, forward and every gradient,
on bf16 activations with float32 modulation/gate/weights, both measured against the same chain in float64: compiled
is no less accurate than eager (max and mean error). On the CPU Inductor keeps eager's intermediate bf16 roundings
(`emulate_precision_casts`), so the activations come out bitwise equal; only float32 sums over tokens move (reduction
order). On CUDA (tests/gpu/test_compiled_ops_gpu.py) Triton kernels keep some of those intermediates in float32, so
values move by up to a unit in the last place, towards the float64 result. The tiny WanDiT trains through them
tracking the eager run; the switch follows the config and is bypassed inside an outer compile.
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


def _chains(b=2, f=3, per=8, d=32, heads=2, device="cpu", double=False):
    """name -> (fn, args): every chain on bf16 activations with float32 modulation, gate, weights and float64 RoPE
    tables; double=True: the same values (the bf16 ones exactly) in float64, where the chain is exact math (hi()
    and type_as keep float64: no intermediate rounding), the reference both eager and compiled are measured to."""
    g = torch.Generator().manual_seed(0)
    act, par = (torch.float64, torch.float64) if double else (torch.bfloat16, torch.float32)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device, act)  # noqa: E731
    p = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device, par)  # noqa: E731
    x, y = r(b, f * per, d), r(b, f * per, d)
    shift, scale, gate = p(b, f, d), p(b, f, d), p(b, f, d)
    ln = wan.FP32LayerNorm(d, 1e-6, elementwise_affine=False)
    ln_affine = wan.FP32LayerNorm(d, 1e-6, elementwise_affine=True)
    rms = RMSNorm(d, 1e-6)
    ln, ln_affine, rms = (m.to(device, par) for m in (ln, ln_affine, rms))
    with torch.no_grad():
        for q in (*ln_affine.parameters(), rms.weight):
            q.copy_(1 + 0.5 * torch.randn(q.shape, generator=g))
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


def compare_to_float64(name: str, device: str = "cpu", **shape) -> list[tuple[float, float, float]]:
    """Compiled and eager runs of chain `name` against its float64 run: per output / gradient, (share of values where
    compiled != eager, compiled's max error / eager's, compiled's mean error / eager's). Asserts compiled is no
    less accurate than eager: max and mean error within 1.25x eager's (or half a unit in the last place at the
    largest value, where eager is exact)."""
    fn, args = _chains(device=device, **shape)[name]
    compiled_ops.enable(True)
    try:
        got = _run(fn, args)
    finally:
        compiled_ops.enable(False)
    want = _run(fn, args)
    ref = _run(*_chains(device=device, double=True, **shape)[name])
    rows = []
    for i, (a, b, r) in enumerate(zip(got, want, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape == r.shape, (name, i)
        ec, ee = (a.double() - r).abs(), (b.double() - r).abs()
        half_ulp = 0.5 * torch.finfo(b.dtype).eps * r.abs().max().item()
        assert ec.max() <= max(1.25 * ee.max().item(), half_ulp), (name, i, ec.max().item(), ee.max().item())
        assert ec.mean() <= 1.25 * ee.mean().item() + 0.01 * half_ulp, (name, i, ec.mean().item(), ee.mean().item())
        rows.append(((a != b).float().mean().item(), (ec.max() / ee.max().clamp_min(1e-300)).item(),
                     (ec.mean() / ee.mean().clamp_min(1e-300)).item()))
    assert got[0].abs().max() > 0.1
    return rows


@pytest.mark.parametrize("name", ["norm_modulate", "layer_norm_affine", "gated_residual", "rms_norm", "rope"])
def test_compiled_chain_no_less_accurate_than_eager(name, compiled):
    rows = compare_to_float64(name)
    assert rows[0][0] == 0.0, (name, rows)           # on the CPU Inductor keeps eager's roundings: same activations


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
