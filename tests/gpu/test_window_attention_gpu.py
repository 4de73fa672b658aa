"""GPU lane: the window attention kernel (inference/kernels/window_attention_triton.py) compiled, at the 1.3B / 5B
head geometry (d 128; chunks shortened to keep the oracles quick), and its use inside the compiled + CUDA-graphed
chunk step.

- bf16 mode vs float64 attention of the same BF16 K/V, and vs cuDNN SDPA: <= 1e-2 relative;
- nvfp4 mode vs float64 attention of the dequantized packed window: <= 1e-2; an empty region (garbage) is skipped;
- fp8 mode vs float64 attention of the unquantized BF16 inputs: <= 8e-2 (CPU interpreter measured 4-5%), and vs the
  torch emulation of the same FP8 math (fp32 accumulation): <= 1.5e-2 - Hopper's FP8 MMA accumulates with ~14 bits
  (H100 measured 5.4-5.8e-3; the interpreter 7e-8), while a dropped 64-key tile would move the output by ~6%;
- the fused FP8 quantizer on CUDA is bitwise the torch quantizer;
- tiny model: compile+cuda_graph == eager with infer.attention=fp8, triton and cudnn-fp8 (one capture; the
  autotuner and cuDNN's plan build run in the warm-up before capture).

Run through `device`: python -m pytest -q -m gpu tests/gpu/test_window_attention_gpu.py
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GEOMETRY = {"1.3b": (12, 1560), "5b": (24, 880)}     # (heads, tokens per chunk); 4 regions of keys, Sq = one chunk


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _window(heads: int, tpc: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, tpc, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4 * tpc, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 4 * tpc, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, k, v


@pytest.mark.parametrize("model", list(GEOMETRY))
@pytest.mark.parametrize("empty_region", [False, True])
def test_bf16_and_fp8_modes(model, empty_region):
    from megatron_longlive.inference.kernels.window_attention_ref import fp8_emulation, reference_attention
    from megatron_longlive.inference.kernels.window_attention_triton import quantize_fp8, window_attention

    heads, tpc = GEOMETRY[model]
    q, k, v = _window(heads, tpc)
    valid = None
    if empty_region:
        valid = torch.tensor([True, True, False, True], device="cuda")
        k[:, 2 * tpc:3 * tpc] = float("nan")
        v[:, 2 * tpc:3 * tpc] = 0.0                # the V amax runs over the whole window: keep it finite
    ref = reference_attention(q, k, v, tpc, valid)
    out = window_attention(q, k, v, tpc, valid, mode="bf16")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-2, _rel(out, ref)
    if not empty_region:
        sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        assert _rel(out, sdpa) <= 1e-2, _rel(out, sdpa)
    k = torch.nan_to_num(k, nan=0.0)
    key_valid = None if valid is None else valid.repeat_interleave(tpc)
    q8, qs, k8, ks, v8, vs = quantize_fp8(q, k, v, key_valid)
    out = window_attention(q8, k8, v8, tpc, valid, mode="fp8", q_scale=qs, k_scale=ks, v_scale=vs,
                           out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    err = _rel(out, reference_attention(q, k, v, tpc, valid))
    print(f"{model} fp8 vs float64 of the unquantized inputs: {err:.3e}")
    assert err <= 8e-2
    pinned = window_attention(q8, k8, v8, tpc, valid, mode="fp8", q_scale=qs, k_scale=ks, v_scale=vs,
                              out_dtype=torch.float32, block_m=128, block_n=64)
    emu = fp8_emulation(q8, qs, k8, ks, v8, vs, tpc, valid, block_n=64)
    print(f"{model} fp8 kernel vs its fp32-accumulating emulation: {_rel(pinned, emu):.3e}")
    assert _rel(pinned, emu) <= 1.5e-2, _rel(pinned, emu)


@pytest.mark.parametrize("model", list(GEOMETRY))
def test_nvfp4_mode_over_the_packed_cache(model):
    from megatron_longlive.inference.kv_cache import CacheLayout
    from megatron_longlive.quant.nvfp4.kv_cache import NVFP4KVCache

    heads, tpc = GEOMETRY[model]
    cache = NVFP4KVCache(CacheLayout(1, 1, 1, tpc), 1, 1, heads, 128, dtype=torch.bfloat16, device="cuda",
                         attention="fused")
    q, k, v = _window(heads, tpc, seed=1)
    cache.hook(0)(k[:, :tpc], v[:, :tpc], None)
    cache.set_sink(0, "global")                      # the shot sink (region 2) stays empty
    cache.hook(0)(k[:, tpc:2 * tpc] * 2, v[:, tpc:2 * tpc], None)
    cache.append(1)
    kv, none_v, mask = cache.hook(0)(k[:, 2 * tpc:3 * tpc], v[:, 2 * tpc:3 * tpc], None)
    assert none_v is None and mask is None and not kv.all_valid
    cache.k_codes[0, :, 2 * tpc:3 * tpc] = 0x77      # garbage in the empty region
    out = kv.attend(q)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = _rel(out, kv.reference_attention(q, torch.float64))
    assert err <= 1e-2, err


def test_fused_quantizer_bitwise_equals_torch():
    from megatron_longlive.inference.kernels.window_attention_triton import quantize_fp8, quantize_fp8_torch

    q, k, v = _window(12, 1560)
    v[0, 5, 0, 7] = 300.0
    for name, a, b in zip(("q8", "q_scale", "k8", "k_scale", "v8", "v_scale"), quantize_fp8(q, k, v),
                          quantize_fp8_torch(q, k, v)):
        assert a.shape == b.shape and a.stride() == b.stride(), name
        a, b = a.contiguous(), b.contiguous()
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        n = int((a != b).sum())
        assert n == 0, f"{name}: {n} of {a.numel()} differ"


@pytest.fixture(scope="module")
def tiny():
    from tests.gpu.gpu_helpers import tiny_cuda_dit

    return tiny_cuda_dit()


def _stream(model, step, attention, chunks=7):
    from megatron_longlive.config import InferConfig
    from megatron_longlive.inference.engine import StreamingEngine

    g = torch.Generator().manual_seed(0)
    infer = InferConfig(height=64, width=64, chunk_frames=1, window_frames=4, sink_frames=1, shot_sink_frames=1,
                        attention=attention)
    text = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=g).cuda()
    engine = StreamingEngine(model, infer, (8, 8), step=step)
    engine.set_prompt(text)
    out = []
    with torch.no_grad():
        for c in range(chunks):
            if c == 5:
                engine.set_prompt(0.5 * text, recache=True, new_shot=True)
            out.append(engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=g).cuda()))
    return torch.cat(out, dim=2), engine


@pytest.mark.parametrize("attention", ["fp8", "triton", "cudnn-fp8"])
def test_compile_cuda_graph_equals_eager_with_window_attention(tiny, attention):
    if attention == "cudnn-fp8":
        from megatron_longlive.inference.kernels.cudnn_fp8_attention import unavailable_reason

        if unavailable_reason("cuda"):
            pytest.skip(unavailable_reason("cuda"))
    eager, _ = _stream(tiny, "eager", attention)
    sdpa, _ = _stream(tiny, "eager", "sdpa")
    fast, engine = _stream(tiny, "compile+cuda_graph", attention)
    assert engine.step.captures == 1
    assert (fast - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()
    print(f"tiny model, attention={attention} vs sdpa: max |diff| {(eager - sdpa).abs().max().item():.3e}")
