"""NVFP4 KV cache (quant/nvfp4/kv_cache.py) and the fused NVFP4-KV attention kernel under TRITON_INTERPRET=1.

- cache writes are bitwise the reference quantizer of each chunk; slot commits copy bytes; recache requantizes;
- the cache behaves like the BF16 cache fed with fake-quantized K/V through every transition;
- the reference attention matches float64 math; the fused kernel matches the reference (<= 1e-3 relative)
  with empty regions skipped (garbage in them changes nothing);
- K/V memory is >= 3.5x smaller than BF16.
"""
from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - the GPU lane runs tests/gpu/test_nvfp4_kv_gpu.py compiled
    pytest.skip("interpreter tests run on CPU machines", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"

from megatron_longlive.inference.kv_cache import CacheLayout, KVCache  # noqa: E402
from megatron_longlive.quant.nvfp4 import reference as R  # noqa: E402
from megatron_longlive.quant.nvfp4.kernels.kv_attention_triton import nvfp4_kv_attention  # noqa: E402
from megatron_longlive.quant.nvfp4.kv_cache import NVFP4KVCache, build_kv_cache  # noqa: E402

B, H = 2, 3
LAYOUT = CacheLayout(num_sink_chunks=1, num_shot_sink_chunks=1, num_window_chunks=2, tokens_per_chunk=40)


def _chunk(seed: int, d: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, LAYOUT.tokens_per_chunk, H, d, generator=g) * scale,
            torch.randn(B, LAYOUT.tokens_per_chunk, H, d, generator=g) * scale * 0.5)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _fill(cache, d: int, layers: int, chunks: int, kind_first_global: bool = True):
    """Drive a cache through the engine's transitions: chunk 0 -> global sink, later chunks -> window."""
    written = {}
    for c in range(chunks):
        for layer in range(layers):
            k, v = _chunk(100 * c + layer, d, scale=1.0 + c)
            cache.hook(layer)(k, v, None)
            written[c, layer] = (k, v)
        if c == 0 and kind_first_global:
            cache.set_sink(c, "global")
        else:
            cache.append(c)
    return written


def test_write_and_commit_are_the_reference_quantizer_bitwise():
    cache = NVFP4KVCache(LAYOUT, 2, B, H, 32)
    written = _fill(cache, 32, 2, 4)               # chunk 3 evicts chunk 1 from the 2-chunk window
    assert cache.stored_chunks() == [(0, 0), (2, 3), (3, 2)]
    for chunk, slot in cache.stored_chunks():
        tok = LAYOUT.tokens(slot)
        for layer in range(2):
            k, v = written[chunk, layer]
            for x, codes, scales, ts in ((k, cache.k_codes, cache.k_scales, cache.k_ts),
                                         (v, cache.v_codes, cache.v_scales, cache.v_ts)):
                want = R.quantize(x)
                assert torch.equal(_bytes(codes[layer, :, tok]), _bytes(want.packed))
                assert torch.equal(_bytes(scales[layer, :, tok]), _bytes(want.scales))
                assert torch.equal(_bytes(ts[layer, slot + 1]), _bytes(want.tensor_scale))
    # the read path: dequantize of a stored slot equals reference.dequantize bitwise
    kd, _ = cache.packed(1).dequantize()
    k3, _ = written[3, 1]
    assert torch.equal(kd[:, LAYOUT.tokens(2)], R.dequantize(*R.quantize(k3)))


def test_transitions_match_bf16_cache_fed_fake_quantized_kv():
    """Same hook outputs (K, V, mask) as the plain cache whose inputs are fake-quantized per chunk, through
    sink, window, eviction, shot-sink clearing and a recache."""
    d, layers = 16, 2
    ref = KVCache(LAYOUT, layers, B, H, d, dtype=torch.float32)
    q4 = NVFP4KVCache(LAYOUT, layers, B, H, d, dtype=torch.float32)

    def step(c, commit):
        for layer in range(layers):
            k, v = _chunk(7 * c + layer, d, scale=0.3 + c)
            got = q4.hook(layer)(k, v, None)
            want = ref.hook(layer)(R.fake_quantize(k), R.fake_quantize(v), None)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert (got[2] is None) == (want[2] is None)
            if got[2] is not None:
                assert torch.equal(got[2].dense(), want[2].dense())
        for cache in (ref, q4):
            commit(cache, c)

    step(0, lambda cache, c: cache.set_sink(c, "global"))
    step(1, lambda cache, c: cache.append(c))           # shot sink still empty: masked region
    step(2, lambda cache, c: cache.set_sink(c, "shot"))
    for c in range(3, 6):
        step(c, lambda cache, c: cache.append(c))
    step(6, lambda cache, c: (cache.clear_shot_sink(), cache.append(c)))
    # recache: both rewrite the stored chunks from one forward's K/V (ours quantizes it per chunk)
    order = q4.begin_recache()
    assert order == ref.begin_recache()
    n = len(order) * LAYOUT.tokens_per_chunk
    for layer in range(layers):
        g = torch.Generator().manual_seed(999 + layer)
        k, v = torch.randn(B, n, H, d, generator=g), torch.randn(B, n, H, d, generator=g)
        fq = [R.fake_quantize(x[:, i:i + LAYOUT.tokens_per_chunk])
              for x in (k, v) for i in range(0, n, LAYOUT.tokens_per_chunk)]
        q4.hook(layer)(k, v, None)
        ref.hook(layer)(torch.cat(fq[:len(order)], 1), torch.cat(fq[len(order):], 1), None)
    q4.end_recache()
    ref.end_recache()
    step(7, lambda cache, c: cache.append(c))


def test_reference_attention_matches_float64():
    cache = NVFP4KVCache(LAYOUT, 1, B, H, 32)
    _fill(cache, 32, 1, 3)                          # sink + 2 window chunks, shot sink empty
    kv = cache.packed(0)
    assert kv.valid.tolist() == [True, True, False, True, True]
    q = torch.randn(B, 24, H, 32, generator=torch.Generator().manual_seed(5))
    k, v = (x.double() for x in kv.dequantize())
    keep = kv.valid.repeat_interleave(LAYOUT.tokens_per_chunk)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k[:, keep]) / 32 ** 0.5
    want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v[:, keep])
    got = kv.reference_attention(q)
    assert (got.double() - want).norm() / want.norm() < 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("d,qdtype", [(32, torch.float32), (64, torch.bfloat16)])
def test_fused_attention_equals_dequantized_reference(d, qdtype):
    cache = NVFP4KVCache(LAYOUT, 1, B, H, d, attention="fused")
    _fill(cache, d, 1, 3)
    kv = cache.packed(0)
    # garbage in the empty shot-sink region must not be read (it is skipped, not just down-weighted)
    empty = LAYOUT.tokens(1)
    cache.k_codes[0, :, empty] = 0x77
    cache.v_codes[0, :, empty] = 0x77
    cache.k_ts[0, 2] = 1e4
    q = torch.randn(B, 40, H, d, generator=torch.Generator().manual_seed(d)).to(qdtype)
    out = nvfp4_kv_attention(q, kv.k_codes, kv.k_scales, kv.k_ts, kv.v_codes, kv.v_scales, kv.v_ts,
                             LAYOUT.tokens_per_chunk, kv.valid, block_m=32, block_n=32)
    ref = kv.reference_attention(q)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-3, _rel(out, ref)
    # the hook in fused mode hands the model this same packed view
    q4_kv, none_v, none_mask = cache.hook(0)(*_chunk(7, d), None)
    assert none_v is None and none_mask is None and q4_kv.k_codes.shape == kv.k_codes.shape


def test_fused_attention_partial_tiles_and_single_region():
    """Sq and Skv not multiples of the tiles; one region only (the current chunk)."""
    d = 32
    cache = NVFP4KVCache(LAYOUT, 1, 1, 2, d)
    k, v = (x[:1, :, :2] for x in _chunk(3, d, scale=4.0))
    cache.hook(0)(k, v, None)
    kv = cache.packed(0)
    assert kv.k_codes.shape[1] == LAYOUT.tokens_per_chunk
    q = torch.randn(1, 21, 2, d, generator=torch.Generator().manual_seed(1))
    out = nvfp4_kv_attention(q, kv.k_codes, kv.k_scales, kv.k_ts, kv.v_codes, kv.v_scales, kv.v_ts,
                             LAYOUT.tokens_per_chunk, kv.valid, block_m=16, block_n=16)
    assert _rel(out, kv.reference_attention(q)) <= 1e-3


def test_memory_ratio_vs_bf16():
    layout = CacheLayout(1, 0, 2, 48)
    bf16 = build_kv_cache("bf16", layout, 3, 1, 4, 128, dtype=torch.bfloat16)
    q4 = build_kv_cache("nvfp4", layout, 3, 1, 4, 128, dtype=torch.bfloat16)
    assert isinstance(q4, NVFP4KVCache) and type(bf16) is KVCache
    bf16_bytes = bf16.memory_bytes()
    values = 2 * 3 * 1 * layout.num_tokens * 4 * 128                     # K and V, all layers
    assert bf16_bytes == values * 2
    regions = 1 + layout.num_slots
    assert q4.kv_bytes() == values // 2 + values // 16 + 2 * 3 * regions * 4   # codes + E4M3 + fp32 / region
    ratio = bf16_bytes / q4.kv_bytes()
    assert ratio >= 3.5, ratio
    with pytest.raises(ValueError, match="quant.kv_cache"):
        build_kv_cache("int8", layout, 1, 1, 1, 16)
    with pytest.raises(ValueError, match="head_dim"):
        NVFP4KVCache(layout, 1, 1, 1, 24)


COMPILE = r"""
import collections, json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_longlive.quant.nvfp4.kernels.kv_attention_triton import nvfp4_kv_attention_kernel as fn
ptrs = {"q_ptr": "*bf16", "valid_ptr": "*i32", "kts_ptr": "*fp32", "vts_ptr": "*fp32", "out_ptr": "*fp32"}
sig = {n: (ptrs.get(n, "*u8") if n.endswith("_ptr") else "fp32" if n == "sm_scale"
           else "constexpr" if n.isupper() and n != "H" else "i32") for n in fn.arg_names}
const = dict(D=128, BLOCK_M=128, BLOCK_N=64, SPLIT_P=True, Q_FP32=True, KV_BLOCKS=293, MMA_BF16=True)
k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=8, num_stages=2))
mma = collections.Counter(re.findall(r"wgmma\.mma_async[a-z0-9._]*", k.asm["ptx"]))
print(json.dumps({"cubin": "cubin" in k.asm, "mma": dict(mma)}))
"""


@pytest.mark.slow
def test_fused_kernel_compiles_for_sm90_on_bf16_tensor_cores():
    """The GPU path (bf16 wgmma, split P, split fp32 query, d=128) compiles for Hopper without a GPU."""
    from process_helpers import compile_report

    out = compile_report(COMPILE, timeout=600)
    assert out["cubin"]
    assert out["mma"] and all(".bf16.bf16" in m for m in out["mma"]), out["mma"]


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    import math

    return 10 * math.log10(((ref.max() - ref.min()) ** 2 / (x - ref).pow(2).mean()).item())


def test_generation_psnr_nvfp4_cache_vs_full_precision_cache(tiny_model):
    """8 streamed chunks of the tiny model: the NVFP4 cache (swapped into the engine) stays within the budget
    (>= 70 dB; measured 79.8 dB) and well above the effect of halving the window (measured 64.5 dB)."""
    from megatron_longlive.config import InferConfig
    from megatron_longlive.inference.engine import StreamingEngine, stream_latents

    cfg = tiny_model.cfg
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(1))

    def run(window: int, nvfp4: bool) -> torch.Tensor:
        infer = InferConfig(chunk_frames=1, window_frames=window, sink_frames=1, num_chunks=8)
        engine = StreamingEngine(tiny_model, infer, (8, 8))
        if nvfp4:
            engine.cache = NVFP4KVCache(engine.layout, cfg.num_layers, 1, cfg.num_heads, cfg.head_dim,
                                        engine.latent_shape, engine.dtype, engine.device)
        chunks = stream_latents(engine, 8, lambda c: text if c == 0 else None, seed=0, progress=False)
        return torch.cat(list(chunks), dim=2)

    full = run(4, False)
    q4 = run(4, True)
    short = run(2, False)
    p_q4, p_short = _psnr(q4, full), _psnr(short, full)
    assert not torch.equal(q4, full)                 # the quantized cache is really in use
    assert p_q4 >= 70.0, p_q4
    assert p_q4 >= p_short + 10.0, (p_q4, p_short)
