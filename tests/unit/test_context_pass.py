"""The streaming context pass writes only the KV cache: `forward_tokens(..., need_output=False)` stops the last block
at its K/V write and skips the head. The cache it leaves must equal the one a whole pass leaves, bitwise (eager),
for the commit of a chunk and for a recache, with the BF16 and the NVFP4 cache."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.models.wan.rope import grid_positions

INFER = InferConfig(height=64, width=64, chunk_frames=1, window_frames=4, sink_frames=1)


def _engine(model, kv_cache: str, whole: bool) -> StreamingEngine:
    """Two chunks generated (sink and window hold data). whole=True: every pass runs the whole model, as before
    the context pass was cut short (the reference)."""
    engine = StreamingEngine(model, INFER, (8, 8), kv_cache=kv_cache)
    if whole:
        def forward_whole(*args, need_output=True, **kwargs):
            return StreamingEngine._forward_tokens(engine, *args, need_output=True, **kwargs)
        engine._forward_tokens = forward_whole
    g = torch.Generator().manual_seed(0)
    engine.set_prompt(torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=g))
    for _ in range(2):
        engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=g))
    return engine


def _state(cache) -> dict[str, torch.Tensor]:
    return {name: value for name, value in vars(cache).items() if isinstance(value, torch.Tensor)}


def _assert_same_cache(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"cache tensor {name} differs"


@pytest.mark.parametrize("kv_cache", ["bf16", "nvfp4"])
def test_kv_only_context_pass_writes_the_same_cache(tiny_model, one_thread, kv_cache):
    whole, kv_only = _engine(tiny_model, kv_cache, True), _engine(tiny_model, kv_cache, False)
    _assert_same_cache(whole.cache, kv_only.cache)           # two commits and their context passes so far
    before = {k: v.clone() for k, v in _state(kv_only.cache).items()}
    clean = torch.randn(1, *whole.latent_shape, generator=torch.Generator().manual_seed(1))
    assert kv_only._forward(clean, 0.0, need_output=False) is None
    whole._forward(clean, 0.0)
    _assert_same_cache(whole.cache, kv_only.cache)
    # the last layer's K/V storage (per-layer tensors [L, ...]) did change in the cut pass
    layers = tiny_model.cfg.num_layers
    per_layer = [k for k, v in before.items() if v.dim() and v.shape[0] == layers]
    assert per_layer and all(not torch.equal(_state(kv_only.cache)[k][-1], before[k][-1]) for k in per_layer), \
        per_layer
    # recache under a new prompt: a masked pass over every stored chunk, also without output
    text = torch.randn(1, tiny_model.cfg.text_len, tiny_model.cfg.text_dim, generator=torch.Generator().manual_seed(2))
    for engine in (whole, kv_only):
        engine.set_prompt(text, recache=True)
    _assert_same_cache(whole.cache, kv_only.cache)


def test_without_a_cache_the_pass_is_whole(tiny_model, one_thread):
    """SP inference writes K/V inside its attention cores (kv_cache=None): need_output=False cannot cut it short."""
    tokens, grid = tiny_model.patchify(torch.randn(1, tiny_model.cfg.in_channels, 1, 8, 8))
    positions = grid_positions(*grid, device=tokens.device)
    ctx = tiny_model.embed_context(torch.randn(1, tiny_model.cfg.text_len, tiny_model.cfg.text_dim))
    t = torch.zeros(1, grid[0])
    full = tiny_model.forward_tokens(tokens, t, ctx, positions)
    assert torch.equal(tiny_model.forward_tokens(tokens, t, ctx, positions, need_output=False), full)
