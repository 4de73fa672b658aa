"""Streaming engine on CUDA: cache path (SDPA over the preallocated buffer) vs the teacher-forcing forward.

fp32 (TF32 off) must match like on CPU; bf16 at the 1.3B geometry (1560 tokens/frame, chunk 3, window
12 incl. sink 3; 2 layers to stay small) is compared by relative error, with the TF side on FlexAttention.
"""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig, preset_config
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.training.teacher_forcing import build_tf_inputs, noisy_prediction, tf_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(cfg, dtype):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanDiT(cfg)
        model.init_weights()
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.to(dtype).eval()


def _compare(model, cf, n, h, w, dtype):
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, n * cf, h, w, generator=g).cuda()
    noise = torch.randn(latents.shape, generator=g).cuda()
    sigma = (0.1 + 0.8 * torch.rand(1, n, generator=g)).cuda()
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).cuda().to(dtype)
    with torch.no_grad():
        inputs = build_tf_inputs(model, latents.to(dtype), noise.to(dtype), sigma, cf)
        ref = noisy_prediction(model, tf_forward(model, inputs, model.embed_context(text)), inputs).float()
    engine = StreamingEngine(model, InferConfig(chunk_frames=cf, sink_frames=cf, window_frames=n * cf), (h, w))
    engine.set_prompt(text)
    got = []
    for i in range(n):
        s = sigma[0, i].item()
        x, e = latents[:, :, i * cf:(i + 1) * cf], noise[:, :, i * cf:(i + 1) * cf]
        got.append(engine.predict(((1 - s) * x + s * e).to(dtype), s).float())
        engine.commit(x.to(dtype))
    return torch.cat(got, dim=2), ref


def test_streaming_equals_teacher_forcing_fp32_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    got, ref = _compare(_model(preset_config("tiny"), torch.float32), cf=2, n=4, h=16, w=16, dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_streaming_matches_teacher_forcing_bf16_1p3b_geometry():
    cfg = preset_config("wan2.1-1.3b", num_layers=2)
    got, ref = _compare(_model(cfg, torch.bfloat16), cf=3, n=4, h=60, w=104, dtype=torch.bfloat16)
    err = (got - ref).norm() / ref.norm()
    assert err < 2e-2, err
