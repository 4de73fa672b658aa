"""GPU lane: the NVFP4 KV cache and the compiled fused NVFP4-KV attention at the 1.3B / 5B head geometry.

- cache writes on CUDA (Triton quantizer) are bitwise the CPU reference quantizer;
- fused attention (bf16 tensor cores, split P) equals SDPA over the dequantized cache within 1e-3 relative,
  for bf16 and fp32 queries, with an empty region skipped; the one-pass P variant within 1e-2.

Run through `device`: python -m pytest -q -m gpu tests/gpu/test_nvfp4_kv_gpu.py
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (heads, tokens per chunk): 1.3B has 12 heads, 5B 24; chunk sizes shortened to keep the fp32 oracle quick
GEOMETRY = {"1.3b": (12, 1560), "5b": (24, 880)}


def _cache(heads: int, tpc: int, fill: list[str]):
    from megatron_longlive.inference.kv_cache import CacheLayout
    from megatron_longlive.quant.nvfp4.kv_cache import NVFP4KVCache

    cache = NVFP4KVCache(CacheLayout(1, 1, 2, tpc), 1, 1, heads, 128, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    written = []
    for c, where in enumerate(fill):
        k = torch.randn(1, tpc, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16) * (1 + c)
        v = torch.randn(1, tpc, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        cache.hook(0)(k, v, None)
        written.append((k, v))
        if where == "sink":
            cache.set_sink(c, "global")
        elif where == "window":
            cache.append(c)
    return cache, written


@pytest.mark.parametrize("model", list(GEOMETRY))
def test_cuda_writes_equal_cpu_reference(model):
    from megatron_longlive.quant.nvfp4 import reference as R

    heads, tpc = GEOMETRY[model]
    cache, written = _cache(heads, tpc, ["sink", "window"])
    for (k, v), slot in zip(written, (0, 2)):
        tok = cache.layout.tokens(slot)
        want = R.quantize(k.cpu())
        assert torch.equal(cache.k_codes[0, :, tok].cpu(), want.packed)
        assert torch.equal(cache.k_scales[0, :, tok].cpu().view(torch.uint8), want.scales.view(torch.uint8))
        assert torch.equal(cache.k_ts[0, slot + 1].cpu(), want.tensor_scale)


@pytest.mark.parametrize("model", list(GEOMETRY))
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
def test_fused_attention_equals_reference(model, qdtype):
    from megatron_longlive.quant.nvfp4.kernels.kv_attention_triton import nvfp4_kv_attention

    heads, tpc = GEOMETRY[model]
    cache, _ = _cache(heads, tpc, ["sink", "window", "window", "current"])   # shot sink empty
    kv = cache.packed(0)
    assert kv.valid.tolist() == [True, True, False, True, True]
    q = torch.randn(1, tpc, heads, 128, device="cuda").to(qdtype)
    ref = kv.reference_attention(q, torch.float64)       # fp64 oracle: no TF32 anywhere
    for split, tol in ((True, 1e-3), (False, 1e-2)):
        out = nvfp4_kv_attention(q, kv.k_codes, kv.k_scales, kv.k_ts, kv.v_codes, kv.v_scales, kv.v_ts, tpc,
                                 kv.valid, split_p=split)
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= tol, (model, qdtype, split, err)
