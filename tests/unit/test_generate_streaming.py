"""`generate` with streaming decode (infer.streaming_decode, the default): each chunk is decoded by the causal
streaming decoder in a worker and appended to the mp4 while later chunks generate. It must give the same latents,
the same video (== the whole-video diffusers decode, float32 <= 1e-4) and the same mp4 frames as decoding at the end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longlive.config import load_config
from megatron_longlive.inference.pipeline import generate_video
from megatron_longlive.inference.prompts import PromptSegment
from megatron_longlive.inference.video_writer import read_mp4

from generate_helpers import tiny_dit

SETTINGS = ["infer.num_chunks=4", "infer.chunk_frames=1", "infer.window_frames=3", "infer.sink_frames=1",
            "infer.height=32", "infer.width=32", "infer.denoising_steps=[1000,500]"]


@pytest.mark.parametrize("mode", ["thread", "sync"])
def test_streaming_decode_equals_decode_at_the_end(tmp_path, mode, one_thread):
    segments = [PromptSegment(0, "a red square slides right"), PromptSegment(2, "a blue circle moves down")]
    runs = {}
    for streaming in (False, True):
        cfg = load_config(None, SETTINGS + [f"infer.streaming_decode={str(streaming).lower()}",
                                            f"infer.decode_mode={mode}"])
        out = tmp_path / f"{streaming}.mp4"
        runs[streaming] = (generate_video(cfg, tiny_dit(cfg.model), segments, str(out), progress=False), out)
    (end, end_mp4), (streamed, streamed_mp4) = runs[False], runs[True]
    assert torch.equal(streamed.latents, end.latents)
    assert streamed.video.shape == end.video.shape == (1, 3, 1 + 4 * 3, 32, 32)
    assert (streamed.video - end.video).abs().max().item() <= 1e-4
    a, b = read_mp4(streamed_mp4).astype(int), read_mp4(end_mp4).astype(int)
    assert a.shape == b.shape == (13, 32, 32, 3)
    # the same frames through a lossy H.264 encoder: a one-level uint8 flip (from the <= 1e-4 difference) can move
    # a few neighbouring pixels by a few levels, nothing more (measured: max 4, mean < 0.01)
    assert np.abs(a - b).max() <= 8 and np.abs(a - b).mean() < 0.05


def test_bad_decode_settings_are_rejected():
    from megatron_longlive.config import ConfigError

    with pytest.raises(ConfigError, match="decode_device"):
        load_config(None, ["infer.decode_mode=device"])
    with pytest.raises(ConfigError, match="chunk_step"):
        load_config(None, ["infer.chunk_step=fastest"])


def test_recache_on_switch_rewrites_the_window_under_the_new_prompt(one_thread):
    """infer.recache_on_switch: a plain prompt switch recaches (LongLive's default) - the same as a manual
    engine run with set_prompt(recache=True) - and differs from the switch without recache."""
    from megatron_longlive.inference.engine import StreamingEngine
    from megatron_longlive.inference.pipeline import load_encoders

    segments = [PromptSegment(0, "a red square slides right"), PromptSegment(2, "a blue circle moves down")]
    out = {}
    for flag in (False, True):
        cfg = load_config(None, SETTINGS + [f"infer.recache_on_switch={str(flag).lower()}"])
        out[flag] = generate_video(cfg, tiny_dit(cfg.model), segments, None, progress=False).latents
    assert not torch.allclose(out[True][:, :, 2:], out[False][:, :, 2:])
    assert torch.equal(out[True][:, :, :2], out[False][:, :, :2])     # before the switch nothing differs
    # by hand: the engine with an explicit recache at the switch
    cfg = load_config(None, SETTINGS)
    _, text = load_encoders(cfg)
    engine = StreamingEngine(tiny_dit(cfg.model), cfg.infer, (4, 4))
    gen = torch.Generator().manual_seed(cfg.infer.seed)
    chunks = []
    for c in range(cfg.infer.num_chunks):
        if c in (0, 2):
            engine.set_prompt(text.encode([segments[c // 2].prompt]), recache=c == 2)
        chunks.append(engine.generate_chunk(torch.randn(1, *engine.latent_shape, generator=gen)))
    assert torch.equal(torch.cat(chunks, dim=2), out[True])
