"""Long generation keeps memory flat: 1,000 chunks of the tiny model with sinks, window and shot switches.

Measured: the cache's allocated bytes (must not change) and the process peak RSS (ru_maxrss) between chunk
100 and chunk 1,000 (must not grow beyond a small allocator slack). Recorded in inference/README.md."""
from __future__ import annotations

import resource

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.inference.sinks import visible_chunks

H = W = 4          # 2x2 tokens per frame: the smallest grid, so 1,000 chunks take seconds


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


@pytest.mark.slow
def test_memory_flat_over_1000_chunks(tiny_model):
    """~35 s on one loaded core (2,000 tiny forwards + 10 recaches); one thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_1000_chunks(tiny_model)
    finally:
        torch.set_num_threads(threads)


def _run_1000_chunks(tiny_model):
    n, cfg = 1000, tiny_model.cfg
    infer = InferConfig(chunk_frames=1, sink_frames=1, shot_sink_frames=1, window_frames=5, denoising_steps=[1000])
    engine = StreamingEngine(tiny_model, infer, (H, W), batch=1)
    g = torch.Generator().manual_seed(0)
    texts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) for _ in range(3)]
    cache_bytes = engine.cache.memory_bytes()
    shot_starts, rss = [], {}
    for c in range(n):
        if c % 97 == 0:                                    # a prompt switch + new shot + recache every 97 chunks
            engine.set_prompt(texts[(c // 97) % 3], recache=c > 0, new_shot=True)
            shot_starts.append(c)
        engine.generate_chunk(torch.randn(1, cfg.in_channels, 1, H, W, generator=g))
        if c + 1 in (100, n):
            rss[c + 1] = _peak_rss_mib()
            assert engine.cache.memory_bytes() == cache_bytes
    stored = [ch for ch, _ in engine.cache.stored_chunks()]
    assert stored == visible_chunks(n, shot_starts, engine.rule) and len(stored) <= 4
    growth = rss[n] - rss[100]
    print(f"\ncache {cache_bytes} B constant; peak RSS {rss[100]:.1f} MiB at chunk 100 -> {rss[n]:.1f} MiB at "
          f"chunk {n} (+{growth:.2f} MiB)")
    assert growth < 2.0, f"peak RSS grew {growth:.1f} MiB over {n - 100} chunks"
