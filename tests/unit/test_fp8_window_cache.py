"""`infer.attention=cudnn-fp8` on the CPU: the per-head E4M3 quantizer, the static q/K bounds, the FP8 shadow of the
KV cache (fp8_kv_cache.py) and its attention through the exact emulation (the cuDNN kernel itself runs in
tests/gpu/test_cudnn_fp8_attention_gpu.py).

Budgets (relative Frobenius error, random N(0,1) data):
- quantizer: Triton (interpreter) == torch reference bitwise; torch reference == nearest-even E4M3 from float64;
- attention of the shadow vs float64 attention of the unquantized window: <= 8e-2 (E4M3 q, K, V and P; measured
  4.95e-2), and vs float64 attention of the dequantized codes (P's E4M3 rounding only): <= 3e-2 (measured 1.87e-2);
- engine latents, cudnn-fp8 vs sdpa through a shot switch with recache: PSNR >= 50 dB (measured 83.5 dB), with
  guidance (two cache rows): >= 50 dB (measured 77.2 dB); the plain 4-chunk stream is in test_window_attention.py
  (81.4 dB).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - the GPU test runs the cuDNN kernel
    pytest.skip("CPU tests (emulated FP8 attention, interpreted quantizer)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

from megatron_longlive.inference.fp8_kv_cache import (  # noqa: E402
    V_MARGIN, FP8WindowKVCache, qk_static_bounds, with_static_bounds)
from megatron_longlive.inference.kernels.fp8_head_quant_triton import (  # noqa: E402
    quantize_per_head, quantize_per_head_torch)
from megatron_longlive.inference.kernels.window_attention_ref import reference_attention  # noqa: E402
from megatron_longlive.inference.kv_cache import CacheLayout  # noqa: E402
from megatron_longlive.quant.nvfp4.kv_cache import build_kv_cache  # noqa: E402

B, H, D, T = 1, 2, 32, 24


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _same(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of E4M3 codes whose values differ (the interpreter drops the sign of an underflowed zero: -0 == 0)."""
    return int((a.float() != b.float()).sum())


def _e4m3_nearest_even(y: torch.Tensor) -> torch.Tensor:
    """float64 -> the value of the E4M3 code nearest to clamp(y, +-448), ties to the even code: a brute force."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    vals = codes.double()
    ok = torch.isfinite(vals)
    codes, vals = torch.arange(256)[ok], vals[ok]
    y = y.double().clamp(-448, 448).reshape(-1, 1)
    dist = (y - vals[None]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tie = dist == best
    even = tie & (codes[None] % 2 == 0)
    pick = torch.where(even.any(1), even.float().argmax(1), tie.float().argmax(1))
    return vals[pick]


def test_quantizer_bitwise_and_nearest_even():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, H, D, generator=g) * torch.tensor([1.0, 50.0])[None, None, None, :, None]
    x[0, 0, 3, 1, 5] = 1e6                                        # saturates
    x[1, 1, 7, 0, :] = 0.0
    scale = torch.rand(3, H, generator=g) * 0.2 + 0.01
    cache_like = torch.randn(3, 2, 64, H, D, generator=g).bfloat16()[:, :, 8:48]    # strided S, as a cache slice
    for xx in (x, x.bfloat16(), cache_like):
        got = quantize_per_head(xx, scale)
        want = quantize_per_head_torch(xx, scale)
        diff = _same(got, want)
        assert diff == 0, f"{diff} of {got.numel()} codes differ"
        exact = _e4m3_nearest_even(xx.double() / scale.double()[:, None, None, :, None])
        assert torch.equal(want.double().reshape(-1), exact), "torch reference is not nearest-even E4M3"
    out = torch.zeros(3, 2, 64, H, D, dtype=torch.float8_e4m3fn)
    quantize_per_head(cache_like, scale, out=out[:, :, 8:48])     # into a strided destination
    assert _same(out[:, :, 8:48], quantize_per_head_torch(cache_like, scale)) == 0
    assert int(out[:, :, :8].view(torch.uint8).sum()) == 0 and int(out[:, :, 48:].view(torch.uint8).sum()) == 0
    with pytest.raises(ValueError, match="scale"):
        quantize_per_head(x, scale[:, :1])


def test_static_qk_bounds_hold_and_are_reached(tiny_model):
    """|q|, |k| after the qk RMS norm and RoPE never exceed qk_static_bounds, on real activations and on the worst
    case (all energy in the channel with the largest gain), which comes within the 1.02 margin of the bound."""

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in tiny_model.blocks:
            for norm in (blk.self_attn.norm_q, blk.self_attn.norm_k):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 3 + 0.2)
    qb, kb = qk_static_bounds(tiny_model)
    seen = torch.zeros(len(tiny_model.blocks), 2)
    hooks = []
    for i, blk in enumerate(tiny_model.blocks):
        def rec(mod, args, i=i):
            q, k = args[0], args[1]
            seen[i, 0] = max(seen[i, 0], q.abs().max())
            seen[i, 1] = max(seen[i, 1], k.abs().max())
        hooks.append(blk.self_attn.core.register_forward_pre_hook(rec))
    cfg = tiny_model.cfg
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g) * 5
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        tiny_model(x, torch.tensor([500.0]), ctx)
    for h in hooks:
        h.remove()
    assert bool((seen[:, 0] <= qb).all()) and bool((seen[:, 1] <= kb).all()), (seen, qb, kb)
    # worst case: a one-hot input to the norm reaches sqrt(dim) * gain in one channel
    attn = tiny_model.blocks[0].self_attn
    c = int(attn.norm_q.weight.abs().argmax())
    onehot = torch.zeros(1, 1, cfg.dim)
    onehot[..., c] = 3.0
    peak = attn.norm_q(onehot).abs().max()
    assert qb[0] / 1.03 <= peak <= qb[0], (peak, qb[0])


def _cache(layout, num_layers=2, bounds=(8.0, 6.0)):
    cache = build_kv_cache("bf16", layout, num_layers, B, H, D, attention="cudnn-fp8")
    assert isinstance(cache, FP8WindowKVCache)
    cache.set_qk_bounds(torch.full((num_layers,), bounds[0]), torch.full((num_layers,), bounds[1]))
    return cache


def _chunk(seed: int, vscale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, T, H, D, generator=g)).clamp(-5.9, 5.9)   # within the K bound given to _cache
    v = torch.randn(B, T, H, D, generator=g) * vscale * torch.tensor([1.0, 3.0])[None, None, :, None]
    return k, v


def test_shadow_codes_follow_the_bf16_cache_through_sink_window_and_eviction():
    layout = CacheLayout(num_sink_chunks=1, num_shot_sink_chunks=0, num_window_chunks=2, tokens_per_chunk=T)
    cache = _cache(layout)
    for chunk in range(5):
        for layer in range(2):
            k, v = _chunk(10 * chunk + layer, vscale=1.0 + chunk)
            win, _, _ = cache.hook(layer)(k, v, None)
            if chunk == 0:   # nothing stored: the chunk's own per-head amax
                want_vs = (v.abs().amax(dim=(0, 1, 3)) / 448)
                assert torch.equal(win.fp8.v_scale, want_vs)
            else:
                assert torch.equal(win.fp8.v_scale, cache.v_scale[layer])
        if chunk == 0:
            cache.set_sink(chunk, "global")
        else:
            cache.append(chunk)
        slots = [s for s, c in enumerate(cache.slot_chunk) if c is not None]
        amax = torch.stack([cache.v[:, :, layout.tokens(s)].abs().amax(dim=(1, 2, 4)) for s in slots]).amax(0)
        assert torch.equal(cache.v_scale, amax * V_MARGIN / 448)
        for s in slots:
            tok = layout.tokens(s)
            ks = cache.k_scale[:, None].expand(2, H)
            assert _same(cache.k8[:, :, tok], quantize_per_head_torch(cache.k[:, :, tok], ks)) == 0
            assert _same(cache.v8[:, :, tok], quantize_per_head_torch(cache.v[:, :, tok], cache.v_scale)) == 0
    assert cache.slot_chunk == [0, 3, 4]          # the sink kept, the window rolled
    assert cache.memory_bytes() == 2 * cache.k.numel() * 4 + 2 * cache.k.numel()


def test_attention_over_the_shadow_vs_float64():
    layout = CacheLayout(num_sink_chunks=1, num_shot_sink_chunks=0, num_window_chunks=2, tokens_per_chunk=T)
    cache = _cache(layout, num_layers=1)
    for chunk in range(3):
        k, v = _chunk(chunk)
        win, _, _ = cache.hook(0)(k, v, None)
        if chunk < 2:
            (cache.set_sink if chunk == 0 else cache.append)(chunk)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, D, generator=g).clamp(-7.9, 7.9)
    out = win.attend(q)
    assert out.shape == q.shape and torch.isfinite(out).all()
    err_unq = _rel(out, reference_attention(q, win.k, win.v, T))
    w = win.fp8
    deq = (w.k8.float() * w.k_scale, w.v8.float() * w.v_scale[:, None])
    q8 = quantize_per_head_torch(q[None], w.q_scale.reshape(1, 1).expand(1, H))[0].float() * w.q_scale
    err_deq = _rel(out, reference_attention(q8, *deq, T))
    print(f"cudnn-fp8 emulation: vs unquantized {err_unq:.2e}, vs dequantized codes {err_deq:.2e}")
    assert err_unq <= 8e-2 and err_deq <= 3e-2


def test_window_with_an_empty_region_is_attended_in_bf16_with_its_mask():
    layout = CacheLayout(num_sink_chunks=1, num_shot_sink_chunks=1, num_window_chunks=1, tokens_per_chunk=T)
    cache = _cache(layout, num_layers=1)
    k, v = _chunk(0)
    cache.hook(0)(k, v, None)
    cache.set_sink(0, "global")
    cache.hook(0)(*_chunk(1), None)
    cache.append(1)                                # the shot sink (slot 1) stays empty: a hole
    win, _, _ = cache.hook(0)(*_chunk(2), None)
    assert not win.all_valid
    q = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(3))
    assert torch.equal(win.attend(q), reference_attention(q, win.k, win.v, T, win.valid, dtype=q.dtype))


def test_errors_name_the_fix(tiny_model):
    layout = CacheLayout(num_sink_chunks=1, num_shot_sink_chunks=0, num_window_chunks=1, tokens_per_chunk=T)
    cache = build_kv_cache("bf16", layout, 1, B, H, D, attention="cudnn-fp8")
    with pytest.raises(RuntimeError, match="set_qk_bounds"):
        cache.hook(0)(*_chunk(0), None)
    with pytest.raises(ValueError, match="positive"):
        cache.set_qk_bounds(torch.zeros(1), torch.ones(1))
    with pytest.raises(ValueError, match="cudnn-fp8"):
        build_kv_cache("nvfp4", layout, 1, B, H, D, attention="cudnn-fp8")
    tiny_model.blocks[0].self_attn.norm_k = torch.nn.Identity()
    with pytest.raises(ValueError, match="qk_norm"):
        with_static_bounds(build_kv_cache("bf16", layout, len(tiny_model.blocks), B, H, D, attention="cudnn-fp8"),
                           tiny_model)
    from megatron_longlive.config import InferConfig

    with pytest.raises(ValueError, match="cudnn-fp8"):
        InferConfig(attention="cudnn")
    from megatron_longlive.inference.kernels.cudnn_fp8_attention import cudnn_fp8_attention, unavailable_reason

    assert "not a CUDA device" in unavailable_reason("cpu")
    x8 = torch.zeros(1, T, H, D, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="CUDA float8_e4m3fn"):
        cudnn_fp8_attention(x8, x8, x8, torch.ones(()), torch.ones(()), D ** -0.5)


def _psnr(a, b) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(b.abs().max().item() ** 2 / mse)


def test_engine_shot_switch_with_recache_and_an_empty_shot_sink(tiny_model):
    """The GPU lane's scenario on the CPU: a shot sink, 7 chunks, a new shot with recache at chunk 5 (the shot sink
    is empty for one chunk: BF16 fallback; the recache re-quantizes K and V from BF16). Close to sdpa throughout."""
    from megatron_longlive.config import InferConfig
    from megatron_longlive.inference.engine import StreamingEngine

    outs = {}
    for mode in ("sdpa", "cudnn-fp8"):
        g = torch.Generator().manual_seed(0)
        infer = InferConfig(height=64, width=64, chunk_frames=1, window_frames=4, sink_frames=1, shot_sink_frames=1,
                            attention=mode)
        text = torch.randn(1, tiny_model.cfg.text_len, tiny_model.cfg.text_dim, generator=g)
        engine = StreamingEngine(tiny_model, infer, (8, 8))
        engine.set_prompt(text)
        out = []
        with torch.no_grad():
            for c in range(7):
                if c == 5:
                    engine.set_prompt(0.5 * text, recache=True, new_shot=True)
                out.append(engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=g)))
        outs[mode] = torch.cat(out, dim=2)
        if mode == "cudnn-fp8":
            cache = engine.cache
            for s in [s for s, c in enumerate(cache.slot_chunk) if c is not None]:
                tok = cache.layout.tokens(s)
                assert _same(cache.k8[:, :, tok], quantize_per_head_torch(
                    cache.k[:, :, tok], cache.k_scale[:, None].expand(-1, cache.v_scale.shape[1]))) == 0
    psnr = _psnr(outs["cudnn-fp8"], outs["sdpa"])
    print(f"shot switch + recache, cudnn-fp8 (emulated) vs sdpa: {psnr:.1f} dB")
    assert psnr >= 50, psnr


COMPILE_SCRIPT = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_longlive.inference.kernels.fp8_head_quant_triton import _quantize_heads_kernel as fn
sig = {n: "i32" for n in fn.arg_names}
sig.update(x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr="*fp32", D="constexpr", BLOCK_R="constexpr",
           INTERPRET="constexpr")
kk = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(D=128, BLOCK_R=64, INTERPRET=False)),
                    target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
ptx = kk.asm["ptx"]
print(json.dumps({"cubin": "cubin" in kk.asm, "div_rn": len(re.findall(r"div\.rn\.f32", ptx)),
                  "div_approx": len(re.findall(r"div\.(?:approx|full)", ptx)),
                  "e4m3_cvt": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx))}))
"""


@pytest.mark.slow
def test_quantizer_compiles_for_sm90_with_ieee_division_and_the_hardware_cast():
    from process_helpers import compile_report

    out = compile_report(COMPILE_SCRIPT, timeout=600)
    assert out["cubin"] and out["div_rn"] > 0 and out["div_approx"] == 0 and out["e4m3_cvt"] > 0, out


def test_engine_with_guidance_two_cache_rows(tiny_model):
    """Classifier-free guidance runs both streams in the batch (B = 2 cache rows): the shadow quantizes each row
    with the layer's shared scales; close to sdpa."""
    from megatron_longlive.config import InferConfig
    from megatron_longlive.inference.engine import StreamingEngine

    outs = {}
    for mode in ("sdpa", "cudnn-fp8"):
        g = torch.Generator().manual_seed(0)
        infer = InferConfig(chunk_frames=1, sink_frames=1, window_frames=3, denoising_steps=[1000, 500],
                            guidance_scale=3.0, attention=mode)
        engine = StreamingEngine(tiny_model, infer, (8, 8))
        text = torch.randn(1, tiny_model.cfg.text_len, tiny_model.cfg.text_dim, generator=g)
        engine.set_prompt(text, negative=torch.zeros_like(text))
        assert engine.rows == 2
        with torch.no_grad():
            outs[mode] = torch.cat([engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=g))
                                    for _ in range(4)], dim=2)
    psnr = _psnr(outs["cudnn-fp8"], outs["sdpa"])
    print(f"guidance (2 rows), cudnn-fp8 (emulated) vs sdpa: {psnr:.1f} dB")
    assert psnr >= 50, psnr
