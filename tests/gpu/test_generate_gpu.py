"""`generate` on the GPU: compiled + CUDA-graphed chunk passes and streaming decode on a side CUDA stream
(compiled + graphed decoder in the worker thread) == eager passes with the whole video decoded at the end
(fp32, TF32 off: latents <= 1e-5 relative, video <= 1e-4); and the CLI end to end in BF16."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.cli.main import main
from megatron_longlive.config import load_config
from megatron_longlive.inference.pipeline import generate_video, load_encoders
from megatron_longlive.inference.prompts import PromptSegment
from megatron_longlive.inference.video_writer import read_mp4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SETTINGS = ["infer.num_chunks=6", "infer.chunk_frames=1", "infer.window_frames=3", "infer.sink_frames=1",
            "infer.height=32", "infer.width=32", "infer.denoising_steps=[1000,500]"]


def _run(tmp_path, fast: bool):
    from tests.unit.generate_helpers import tiny_dit

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    over = [f"infer.chunk_step={'compile+cuda_graph' if fast else 'eager'}",
            f"infer.streaming_decode={'true' if fast else 'false'}", "infer.decode_mode=stream"]
    cfg = load_config(None, SETTINGS + over)
    vae, text = load_encoders(cfg)
    vae.model.to("cuda")
    model = tiny_dit(cfg.model).cuda().eval()
    segments = [PromptSegment(0, "a red square"), PromptSegment(3, "a blue circle", new_shot=False)]
    return generate_video(cfg, model, segments, str(tmp_path / f"{fast}.mp4"), vae, text, progress=False)


def test_fast_generate_equals_eager(tmp_path):
    eager, fast = _run(tmp_path, False), _run(tmp_path, True)
    scale = eager.latents.abs().max().item()
    assert (fast.latents - eager.latents).abs().max().item() <= 1e-5 * scale
    assert fast.video.shape == eager.video.shape
    assert (fast.video - eager.video).abs().max().item() <= 1e-4
    assert read_mp4(tmp_path / "True.mp4").shape[0] == fast.video.shape[2]


def test_generate_cli_bf16_on_cuda(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--device", "cuda", "--out", str(out), "--prompt", "a red square@0", "--no-progress",
               *[a for s in SETTINGS for a in ("--set", s)]])
    assert rc == 0
    frames = read_mp4(out)
    assert frames.shape == (1 + 4 * 5, 32, 32, 3)
