"""`longlive generate --interactive`: prompt lines typed on stdin switch the prompt at the next chunk boundary
('/shot TEXT' = scene cut). A real process reading a real pipe gives the same latents as the library call with
the same schedule written out, and the applied switches are recorded with the latents."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from megatron_longlive.config import load_config
from megatron_longlive.inference.live_prompts import LivePrompts
from megatron_longlive.inference.pipeline import generate_video, load_dit
from megatron_longlive.inference.prompts import PromptSegment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = ["infer.num_chunks=4", "infer.chunk_frames=1", "infer.window_frames=4", "infer.sink_frames=1",
            "infer.shot_sink_frames=1", "infer.height=32", "infer.width=32", "infer.denoising_steps=[1000,500]"]


def test_one_line_per_chunk_boundary_fifo():
    live = LivePrompts(io.StringIO("a blue circle\n\n/shot a green square\n/bogus x\n/quit\nnever read\n"), echo=False)
    live._thread.join(timeout=5)
    assert live(0) is None                                   # chunk 0 keeps the starting prompt
    a, b = live(1), live(2)
    assert (a.start_chunk, a.prompt, a.new_shot) == (1, "a blue circle", False)
    assert (b.start_chunk, b.prompt, b.new_shot, b.where) == (2, "a green square", True, "stdin line 3")
    assert live(3) is None and live(4) is None              # unknown command ignored; nothing after /quit


def test_interactive_cli_equals_the_written_schedule(tmp_path):
    cfg = load_config(None, SETTINGS)
    model = load_dit(cfg, None, seed=3)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    ckpt = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), str(ckpt))
    lat = tmp_path / "live.pt"
    cmd = [sys.executable, "-m", "megatron_longlive.cli.main", "generate", "--checkpoint", str(ckpt),
           "--interactive", "--prompt", "a red square slides right", "--latents-out", str(lat),
           "--out", str(tmp_path / "live.mp4"), "--no-progress", "--device", "cpu"]
    for s in SETTINGS:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate("a blue circle moves down\n/shot a green square appears\n", timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "chunk 1: a blue circle moves down" in out and "chunk 2: new shot: a green square appears" in out
    record = torch.load(lat)
    assert [(p["start_chunk"], p["new_shot"]) for p in record["prompts"]] == [(0, False), (1, False), (2, True)]
    schedule = [PromptSegment(0, "a red square slides right"), PromptSegment(1, "a blue circle moves down"),
                PromptSegment(2, "a green square appears", new_shot=True)]
    want = generate_video(cfg, model, schedule, None, progress=False).latents
    assert torch.allclose(record["latents"], want, atol=1e-6, rtol=0)
