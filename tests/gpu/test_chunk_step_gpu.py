"""CUDA-graphed and compiled chunk steps == eager on the GPU (tiny model, fp32 with TF32 off: bitwise for
the graph replay of the same kernels, <= 1e-5 relative with Inductor's fused kernels), incl. window eviction,
a prompt switch with recache and a new shot; the steady state is captured once."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine
from tests.gpu.gpu_helpers import tiny_cuda_dit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

INFER = InferConfig(height=64, width=64, chunk_frames=1, window_frames=4, sink_frames=1, shot_sink_frames=1)


def _stream(model, step, kv="bf16", chunks=9):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=g).cuda()
    engine = StreamingEngine(model, INFER, (8, 8), step=step, kv_cache=kv)
    engine.set_prompt(text)
    out = []
    for c in range(chunks):
        if c == 5:
            engine.set_prompt(0.5 * text, recache=True, new_shot=True)
        out.append(engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=g).cuda()))
    return torch.cat(out, dim=2), engine


@pytest.fixture(scope="module")
def model():
    return tiny_cuda_dit()


@pytest.mark.parametrize("kv", ["bf16", "nvfp4"])
def test_cuda_graph_equals_eager(model, kv):
    eager, _ = _stream(model, "eager", kv)
    graphed, engine = _stream(model, "cuda_graph", kv)
    # steady state only: one graph for the denoising passes, one for the KV-only context pass (need_output=False)
    assert engine.step.captures == 2
    assert torch.equal(graphed, eager), (graphed - eager).abs().max()


def test_compile_cuda_graph_equals_eager(model):
    eager, _ = _stream(model, "eager")
    fast, engine = _stream(model, "compile+cuda_graph")
    assert engine.step.captures == 2
    assert (fast - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()
