"""KV cache transitions: layout from the config, sink/window bookkeeping, in-place writes, hole masks."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.kv_cache import CacheLayout, KVCache

TPC = 3  # tokens per chunk in these tests


def _cache(sink=1, shot=0, window=2, layers=2, latent_shape=(2, 1, 2, 2)):
    layout = CacheLayout(sink, shot, window, TPC)
    return KVCache(layout, layers, batch=1, num_heads=2, head_dim=4, latent_shape=latent_shape)


def _run_chunk(cache, value):
    """Push a chunk whose K/V are all `value` through every layer's hook; return what layer 0 attends."""
    outs = []
    for layer in range(cache.num_layers):
        k = torch.full((1, TPC, 2, 4), float(value))
        outs.append(cache.hook(layer)(k, -k, None))
    return outs[0]


def test_layout_from_config():
    lay = CacheLayout.from_config(InferConfig(chunk_frames=3, sink_frames=3, window_frames=12), tokens_per_frame=10)
    assert (lay.num_sink_chunks, lay.num_shot_sink_chunks, lay.num_window_chunks) == (1, 0, 2)
    assert lay.tokens_per_chunk == 30 and lay.num_tokens == 4 * 30   # 12 frames incl. the current chunk
    lay = CacheLayout.from_config(InferConfig(chunk_frames=8, sink_frames=8, shot_sink_frames=8, window_frames=32),
                                  tokens_per_frame=880)
    assert (lay.num_sink_chunks, lay.num_shot_sink_chunks, lay.num_window_chunks) == (1, 1, 1)
    with pytest.raises(ValueError, match="infer.sink_frames=2 is not a whole number of chunks"):
        CacheLayout.from_config(InferConfig(chunk_frames=3, sink_frames=2, window_frames=12), 10)
    with pytest.raises(ValueError, match="infer.window_frames=10 is not a whole number of chunks"):
        CacheLayout.from_config(InferConfig(chunk_frames=4, sink_frames=4, window_frames=10), 10)


def test_sink_then_rolling_window_eviction_order():
    cache = _cache(sink=1, window=2)
    seen = []
    for c in range(6):
        k, v, mask = _run_chunk(cache, c + 1)
        seen.append(sorted(set(k[0, :, 0, 0].tolist())))
        assert mask is None and torch.equal(v, -k)
        if c == 0:
            cache.set_sink(c)
        else:
            cache.append(c, torch.full((1, 2, 1, 2, 2), float(c)))
    # chunk c attends (values c+1): itself, the sink chunk 0 (value 1) and the two latest chunks
    assert seen == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4], [1, 3, 4, 5], [1, 4, 5, 6]]
    assert [c for c, _ in cache.stored_chunks()] == [0, 4, 5]
    slot_of_5 = dict(cache.stored_chunks())[5]
    assert cache.latents[slot_of_5].eq(5).all()


def test_writes_are_in_place_and_memory_is_flat():
    cache = _cache(sink=1, window=2)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    before = cache.memory_bytes()
    for c in range(50):
        k, _, _ = _run_chunk(cache, c)
        assert k.data_ptr() == cache.k[0].data_ptr()   # a view of the preallocated buffer, not a copy
        cache.set_sink(c) if c == 0 else cache.append(c)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs and cache.memory_bytes() == before


def test_empty_shot_sink_is_masked_out():
    cache = _cache(sink=1, shot=1, window=2)
    _run_chunk(cache, 1)
    cache.set_sink(0, "global")
    _run_chunk(cache, 2)
    cache.append(1)   # window slot, shot sink still empty -> a hole inside the attended prefix
    k, _, mask = _run_chunk(cache, 3)
    assert k.shape[1] == 4 * TPC and mask is not None
    dense = mask.dense()                                       # [TPC, 4 * TPC]
    assert dense[:, :2 * TPC].all() and not dense[:, 2 * TPC:3 * TPC].any() and dense[:, 3 * TPC:].all()
    cache.set_sink(2, "shot")
    _, _, mask = _run_chunk(cache, 4)
    assert mask is None
    cache.clear_shot_sink()
    assert not cache.sink_full("shot") and [c for c, _ in cache.stored_chunks()] == [0, 1]
    with pytest.raises(RuntimeError, match="global sink is full"):
        cache.set_sink(9, "global")


def test_evict_and_zero_window():
    cache = _cache(sink=1, window=0)
    _run_chunk(cache, 1)
    cache.set_sink(0)
    _run_chunk(cache, 2)
    assert cache.append(1) is None and [c for c, _ in cache.stored_chunks()] == [0]
    cache = _cache(sink=0, window=2)
    with pytest.raises(RuntimeError, match="empty window"):
        cache.evict()
    for c in range(3):
        _run_chunk(cache, c)
        cache.append(c)
    assert [c for c, _ in cache.stored_chunks()] == [1, 2]
    cache.evict()
    assert [c for c, _ in cache.stored_chunks()] == [2]
    cache.reset()
    assert cache.stored_chunks() == []
