"""`longlive generate` end to end on the tiny model: checkpoints in, a real mp4 out whose frames move; bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_longlive.cli.main import main
from megatron_longlive.config import load_config
from megatron_longlive.inference.pipeline import generate_video, load_dit, resolve_checkpoint
from megatron_longlive.inference.prompts import load_prompt_file
from megatron_longlive.inference.video_writer import read_mp4

SMALL = ["--set", "infer.num_chunks=3", "--set", "infer.height=32", "--set", "infer.width=32", "--no-progress"]


def frames_change(frames: np.ndarray, min_diff: float = 1.0) -> bool:
    """True when every pair of consecutive frames [T, H, W, 3] differs by > min_diff (mean abs, 0..255)."""
    diffs = np.abs(np.diff(frames.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))
    return bool(len(diffs) > 0 and diffs.min() > min_diff)


def test_frames_change_detects_a_frozen_video():
    g = np.random.default_rng(0)
    moving = g.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    assert frames_change(moving)
    assert not frames_change(np.repeat(moving[:1], 5, axis=0))
    assert not frames_change(np.concatenate([moving, moving[-1:]]))   # one frozen pair is enough to fail


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random tiny DiT (non-zero head) as a .safetensors checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "dit.safetensors"
    model = load_dit(load_config(), None, seed=3)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    save_file(model.state_dict(), str(path))
    return str(path)


def test_generate_cli_writes_moving_video_and_latents(tmp_path, weights, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"start_chunk": 0, "prompt": "a red square slides right"}\n'
                       '{"start_chunk": 2, "prompt": "a blue circle moves down"}\n')
    out, lat = tmp_path / "v.mp4", tmp_path / "v.safetensors"
    rc = main(["generate", "--checkpoint", weights, "--prompt-file", str(prompts), "--out", str(out),
               "--latents-out", str(lat), *SMALL])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    frames = read_mp4(out)
    assert frames.shape == (1 + 4 * 2, 32, 32, 3)          # 3 latent frames -> 9 pixel frames
    assert frames_change(frames)
    latents = load_file(str(lat))["latents"]
    assert latents.shape == (1, 16, 3, 4, 4) and torch.isfinite(latents).all()
    # deterministic: the library call with the same settings (no decode) gives the same latents
    cfg = load_config(None, [SMALL[i + 1] for i in range(0, 6, 2)])
    again = generate_video(cfg, load_dit(cfg, weights), load_prompt_file(prompts), None, progress=False)
    assert torch.equal(again.latents, latents)


def test_load_dit_from_training_checkpoint_prefers_ema(tmp_path):
    from megatron_longlive.training.checkpoint import CheckpointManager

    cfg = load_config()
    model = load_dit(cfg, None, seed=1)
    optim = torch.optim.AdamW(model.parameters())
    ema = {k: torch.full_like(v, 0.5) for k, v in model.named_parameters()}
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    mgr.save(7, model, optim, None, {"step": 7})
    loaded = load_dit(cfg, str(tmp_path), seed=2)          # run dir -> checkpoints/latest
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    mgr.save(8, model, optim, ema, {"step": 8})
    assert resolve_checkpoint(str(tmp_path)).endswith("step_00000008")
    loaded = load_dit(cfg, str(tmp_path / "checkpoints" / "step_00000008"))
    assert all(torch.equal(p, ema[k]) for k, p in loaded.named_parameters())


def test_generate_bad_input(tmp_path, weights, capsys):
    def err(*argv):
        assert main(["generate", *argv, *SMALL]) == 2
        return capsys.readouterr().err

    assert "missing.jsonl: prompt file not found" in err("--prompt-file", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.txt"
    bad.write_text("0: a red square\nfour: oops\n")
    assert "bad.txt:2: expected 'START_CHUNK: prompt'" in err("--prompt-file", str(bad))
    assert "start chunk 9 is beyond the video (3 chunks" in err("--checkpoint", weights, "--prompt", "a@0",
                                                                "--prompt", "b@9", "--out", str(tmp_path / "x.mp4"))
    assert "either --prompt" in err("--prompt", "a", "--prompt-file", str(bad))
    assert "not found" in err("--checkpoint", str(tmp_path / "nope"), "--prompt", "a")
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert "no complete checkpoint" in err("--checkpoint", str(tmp_path / "run"), "--prompt", "a")
    assert "infer.sink_frames=1 is not a whole number of chunks" in err(
        "--checkpoint", weights, "--prompt", "a", "--set", "infer.chunk_frames=2", "--out", str(tmp_path / "y.mp4"))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The README main job, short: data -> train -> distill a 2-step LoRA -> generate with it; the video moves."""
    rc = main(["demo", "--out-dir", str(tmp_path), "--no-progress", "--set", "train.max_steps=30",
               "--set", "data.num_videos=4", "--set", "infer.num_chunks=6", "--set", "distill.max_steps=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[3/4] distilling a 2-step LoRA" in out and "with 2 denoising steps each" in out
    assert (tmp_path / "distill" / "step_000002" / "generator" / "adapter_model.safetensors").exists()
    video = tmp_path / "video.mp4"
    assert f"video: {video}" in out
    frames = read_mp4(video)
    assert frames.shape[0] == 1 + 4 * 5 and frames_change(frames)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    # two shots with different prompts (issue 8): a scene cut halfway, recorded with the latents
    prompts = torch.load(tmp_path / "latents.pt")["prompts"]
    assert [p["start_chunk"] for p in prompts] == [0, 3] and [p["new_shot"] for p in prompts] == [False, True]
    assert prompts[0]["prompt"] != prompts[1]["prompt"]
    assert "shot 2:" in out
