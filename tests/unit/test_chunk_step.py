"""Compiled chunk step (inference/chunk_step.py) == eager, on CPU through Inductor; mode resolution errors.

The stream covers the cases a compiled step must not get wrong: cache filling (eager), steady state
(compiled), window eviction, a prompt switch with recache, and a new shot whose empty shot sink needs a
mask (eager again until the sink is refilled). CUDA graphs are tested in tests/gpu/test_chunk_step_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.chunk_step import resolve_step_mode
from megatron_longlive.inference.engine import StreamingEngine

INFER = InferConfig(height=64, width=64, chunk_frames=1, window_frames=4, sink_frames=1, shot_sink_frames=1)


def _stream(model, step: str, chunks: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=g)
    engine = StreamingEngine(model, INFER, (8, 8), step=step)
    engine.set_prompt(text)
    out = []
    for c in range(chunks):
        if c == 4:
            engine.set_prompt(0.5 * text, recache=True, new_shot=True)
        out.append(engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=g)))
    return torch.cat(out, dim=2)


def test_compiled_step_equals_eager(tiny_model, one_thread):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _stream(tiny_model, "eager")
    compiled = _stream(tiny_model, "compile")
    # Inductor reorders float32 sums: measured 2.4e-7 max abs diff on values of magnitude ~4.
    assert (compiled - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()
    # one compiled block function serves every layer and chunk: the block splits into two graphs around
    # the cache's eager hook, and the context pass's last block (write_kv, up to the hook) adds one; recompiles
    # per layer or per chunk would show up as many more graphs (30+)
    assert 1 <= counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_step_mode_resolution():
    cpu = torch.device("cpu")
    assert resolve_step_mode("auto", cpu) == "eager"
    assert resolve_step_mode("auto", torch.device("cuda")) == "compile+cuda_graph"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_step_mode("cuda_graph", cpu)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_step_mode("fast", cpu)
